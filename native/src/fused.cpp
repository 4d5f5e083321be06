// Fused ops: sequences that always run together in the SD1.5 UNet and VAE, each done in one FFI
// call instead of ten to thirty (op calls, views and frees). Every one follows the op order of the
// diffusers code it replaces, so it returns what the unfused composition returns; the ATen calls
// are device-agnostic, so the same code serves CPU and CUDA.
//
// In-place steps (activation after a norm, residual adds) only touch tensors made inside the call,
// and only while grad mode is off: with autograd on, every step stays out of place.
#include "dt_internal.h"

namespace dt {

namespace {

// Activation codes shared with ops_spec.ts (ACTIVATIONS there).
enum Act : int32_t { kSilu = 0, kGelu = 1, kRelu = 2 };

void check_act(int32_t act) {
  TORCH_CHECK(act >= kSilu && act <= kRelu, "activation must be 0 (silu), 1 (gelu) or 2 (relu), got ",
              act);
}

at::Tensor activate(const at::Tensor& x, int32_t act, bool inplace) {
  at::Tensor y = x;
  switch (act) {
    case kSilu: return inplace ? at::silu_(y) : at::silu(x);
    case kGelu: return inplace ? at::gelu_(y) : at::gelu(x);
    default: return inplace ? at::relu_(y) : at::relu(x);
  }
}

// Writes into `a` when allowed; a + b either way (IEEE addition commutes, so a + b == b + a).
at::Tensor add_into(at::Tensor a, const at::Tensor& b, bool inplace) {
  return inplace ? a.add_(b) : at::add(a, b);
}

bool may_write_in_place() { return !at::GradMode::is_enabled(); }

// [B, L, H*d] -> [B, H, L, d] (a view)
at::Tensor split_heads(const at::Tensor& x, int64_t heads) {
  return x.reshape({x.size(0), -1, heads, x.size(-1) / heads}).transpose(1, 2);
}

// [B, H, L, d] -> [B, L, H*d]
at::Tensor merge_heads(const at::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), -1, x.size(1) * x.size(3)});
}

at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, false, std::nullopt);
}

// A conv with a square kernel, stride 1 and "same" padding, as ResnetBlock2D's convs.
at::Tensor conv_same(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const int64_t pad = (w.size(-1) - 1) / 2;
  return at::conv2d(x, w, b, {1, 1}, {pad, pad});
}

}  // namespace

at::Tensor attention(const at::Tensor& x, const std::optional<at::Tensor>& context,
                     const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v,
                     const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                     int64_t heads, const std::vector<at::Tensor>& ip_tokens,
                     const std::vector<at::Tensor>& ip_weights,
                     const std::vector<at::Tensor>& ip_scales,
                     const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(heads > 0, "attention: heads must be positive, got ", heads);
  TORCH_CHECK(x.dim() == 3, "attention: x must be [B, L, C], got ", x.sizes());
  TORCH_CHECK(ip_weights.size() == 2 * ip_tokens.size() && ip_scales.size() == ip_tokens.size(),
              "attention: per adapter one token tensor, two weights (to_k_ip, to_v_ip) and one "
              "scale; got ", ip_tokens.size(), " token tensors, ", ip_weights.size(),
              " weights and ", ip_scales.size(), " scales");
  const bool inplace = may_write_in_place();
  const at::Tensor& ctx = context.has_value() ? *context : x;
  // diffusers' AttnProcessor2_0 / IPAdapterAttnProcessor2_0, step by step
  const at::Tensor q = split_heads(at::linear(x, w_q), heads);
  const at::Tensor k = split_heads(at::linear(ctx, w_k), heads);
  const at::Tensor v = split_heads(at::linear(ctx, w_v), heads);
  at::Tensor out = merge_heads(sdpa(q, k, v));
  for (size_t a = 0; a < ip_tokens.size(); a++) {
    const at::Tensor ka = split_heads(at::linear(ip_tokens[a], ip_weights[2 * a]), heads);
    const at::Tensor va = split_heads(at::linear(ip_tokens[a], ip_weights[2 * a + 1]), heads);
    const at::Tensor oa = merge_heads(sdpa(q, ka, va));
    out = add_into(out, at::mul(ip_scales[a], oa), inplace);
  }
  at::Tensor y = at::linear(out, w_out, b_out);
  return residual.has_value() ? add_into(y, *residual, inplace) : y;
}

at::Tensor geglu_feed_forward(const at::Tensor& x, const at::Tensor& w_in,
                              const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                              const std::optional<at::Tensor>& b_out,
                              const std::optional<at::Tensor>& residual) {
  const bool inplace = may_write_in_place();
  const std::vector<at::Tensor> parts = at::linear(x, w_in, b_in).chunk(2, -1);
  TORCH_CHECK(parts.size() == 2, "geglu_feed_forward: the input projection has an odd width");
  // h * gelu(gate), written into gelu's fresh output (the product commutes)
  at::Tensor g = at::gelu(parts[1]);
  g = inplace ? g.mul_(parts[0]) : at::mul(parts[0], g);
  at::Tensor y = at::linear(g, w_out, b_out);
  return residual.has_value() ? add_into(y, *residual, inplace) : y;
}

at::Tensor resnet_block(const at::Tensor& x, const std::optional<at::Tensor>& temb,
                        const at::Tensor& norm1_w, const at::Tensor& norm1_b,
                        const at::Tensor& conv1_w, const std::optional<at::Tensor>& conv1_b,
                        const std::optional<at::Tensor>& temb_w,
                        const std::optional<at::Tensor>& temb_b, const at::Tensor& norm2_w,
                        const at::Tensor& norm2_b, const at::Tensor& conv2_w,
                        const std::optional<at::Tensor>& conv2_b,
                        const std::optional<at::Tensor>& shortcut_w,
                        const std::optional<at::Tensor>& shortcut_b, int64_t groups, double eps,
                        int32_t act, double output_scale) {
  check_act(act);
  TORCH_CHECK(temb.has_value() == temb_w.has_value(),
              "resnet_block: a time embedding needs its projection and vice versa");
  const bool inplace = may_write_in_place();
  // diffusers' ResnetBlock2D.forward with time_embedding_norm "default"
  at::Tensor h = activate(at::group_norm(x, groups, norm1_w, norm1_b, eps), act, inplace);
  h = conv_same(h, conv1_w, conv1_b);
  if (temb.has_value()) {
    const at::Tensor t = at::linear(activate(*temb, act, false), *temb_w, temb_b);
    h = add_into(h, t.unsqueeze(-1).unsqueeze(-1), inplace);
  }
  h = activate(at::group_norm(h, groups, norm2_w, norm2_b, eps), act, inplace);
  h = conv_same(h, conv2_w, conv2_b);
  const at::Tensor skip = shortcut_w.has_value() ? conv_same(x, *shortcut_w, shortcut_b) : x;
  at::Tensor out = add_into(h, skip, inplace);
  if (output_scale != 1.0) out = inplace ? out.div_(output_scale) : at::div(out, output_scale);
  return out;
}

at::Tensor image_to_tokens(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "image_to_tokens: x must be [B, C, H, W], got ", x.sizes());
  return x.permute({0, 2, 3, 1}).reshape({x.size(0), x.size(2) * x.size(3), x.size(1)});
}

at::Tensor tokens_to_image(const at::Tensor& x, int64_t height, int64_t width) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == height * width, "tokens_to_image: x must be [B, ",
              height, " x ", width, ", C], got ", x.sizes());
  return x.reshape({x.size(0), height, width, x.size(2)}).permute({0, 3, 1, 2}).contiguous();
}

}  // namespace dt
