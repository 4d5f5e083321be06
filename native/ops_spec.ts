/**
 * The curated op table: the single source for the generated C++ wrappers
 * (`native/src/ops.gen.cpp`) and their TypeScript bindings (`ffi/ops.gen.ts`).
 * Run `deno task gen:ops` after editing; a test fails while the generated files are stale.
 *
 * Argument kinds:
 *   T      tensor handle                      T?    optional tensor (null = none)
 *   T[]    list of tensors                    int   integer (int32 on the wire: dims, sizes and
 *   int[]  list of integers (int32 too)             indices here never need more, and JS
 *                                                   numbers then cross without BigInt)
 *   f64    double                             f64?  optional double (NaN on the wire = none)
 *   bool   boolean                            dtype scalar type (-1 on the wire = keep)
 *   device device (-1 cpu, k >= 0 cuda:k)     gen   generator handle (null = default generator)
 *
 * Return kinds: T (new tensor, the default), T? (tensor or null without error),
 * T[] (list of new tensors), void (in-place ops), f64 (a scalar read back).
 *
 * `body` is a C++ expression over the argument names; `stmts` is a C++ statement block for ops
 * that are not one expression (it must `return` the value for non-void ops).
 */

export type ArgKind =
  | "T"
  | "T?"
  | "T[]"
  | "int"
  | "int[]"
  | "f64"
  | "f64?"
  | "bool"
  | "dtype"
  | "device"
  | "gen";
export type RetKind = "T" | "T?" | "T[]" | "void" | "f64";

export interface OpSpec {
  name: string;
  /** "name:kind, name:kind" in call order. */
  args: string;
  ret?: RetKind;
  body?: string;
  stmts?: string;
  doc?: string;
}

const unary = (name: string, fn = `at::${name}`): OpSpec => ({
  name,
  args: "x:T",
  body: `${fn}(x)`,
});
const binary = (name: string, fn = `at::${name}`): OpSpec => ({
  name,
  args: "a:T, b:T",
  body: `${fn}(a, b)`,
});
const scalarOp = (name: string, fn: string): OpSpec => ({
  name,
  args: "x:T, s:f64",
  body: `${fn}(x, s)`,
});
const reduceDims = (name: string, fn: string): OpSpec => ({
  name,
  args: "x:T, dims:int[], keepdim:bool",
  body: `${fn}(x, dims, keepdim)`,
});

export const OPS: OpSpec[] = [
  // creation
  {
    name: "zeros",
    args: "shape:int[], dtype:dtype, device:device",
    body: "at::zeros(shape, opts(dtype, device))",
  },
  {
    name: "ones",
    args: "shape:int[], dtype:dtype, device:device",
    body: "at::ones(shape, opts(dtype, device))",
  },
  {
    name: "full",
    args: "shape:int[], value:f64, dtype:dtype, device:device",
    body: "at::full(shape, value, opts(dtype, device))",
  },
  {
    name: "arange",
    args: "start:f64, end:f64, step:f64, dtype:dtype, device:device",
    body: "at::arange(start, end, step, opts(dtype, device))",
  },
  {
    name: "linspace",
    args: "start:f64, end:f64, steps:int, dtype:dtype, device:device",
    body: "at::linspace(start, end, steps, opts(dtype, device))",
  },
  {
    name: "randn",
    args: "shape:int[], dtype:dtype, device:device, gen:gen",
    body: "at::randn(shape, gen, opts(dtype, device))",
  },
  {
    name: "rand",
    args: "shape:int[], dtype:dtype, device:device, gen:gen",
    body: "at::rand(shape, gen, opts(dtype, device))",
  },
  {
    name: "randint",
    args: "low:int, high:int, shape:int[], dtype:dtype, device:device, gen:gen",
    body:
      "at::randint(low, high, shape, gen, opts(dtype < 0 ? 4 /* int64, as PyTorch */ : dtype, device))",
  },
  { name: "zeros_like", args: "x:T", body: "at::zeros_like(x)" },
  { name: "ones_like", args: "x:T", body: "at::ones_like(x)" },
  { name: "full_like", args: "x:T, value:f64", body: "at::full_like(x, value)" },

  // elementwise, unary
  unary("neg"),
  unary("exp"),
  unary("log"),
  unary("sqrt"),
  unary("rsqrt"),
  unary("abs"),
  unary("sin"),
  unary("cos"),
  unary("tanh"),
  unary("sigmoid"),
  unary("silu"),
  unary("relu"),
  unary("erf"),
  unary("square"),
  unary("reciprocal"),
  unary("floor"),
  unary("round"),
  unary("sign"),
  unary("isfinite"),
  unary("logical_not"),
  {
    name: "gelu",
    args: "x:T, tanh:bool",
    body: 'at::gelu(x, tanh ? "tanh" : "none")',
    doc: "GELU, exact (erf) unless `tanh` selects the tanh approximation.",
  },
  {
    name: "quick_gelu",
    args: "x:T",
    body: "x * at::sigmoid(x * 1.702)",
    doc: "CLIP's x * sigmoid(1.702 x), in the same op order as transformers for bitwise parity.",
  },
  { name: "clamp", args: "x:T, min:f64?, max:f64?", body: "at::clamp(x, min, max)" },
  { name: "pow_scalar", args: "x:T, exponent:f64", body: "at::pow(x, exponent)" },

  // elementwise, binary
  binary("add"),
  binary("sub"),
  binary("mul"),
  binary("div"),
  binary("pow"),
  binary("maximum"),
  binary("minimum"),
  {
    name: "add_scaled",
    args: "a:T, b:T, alpha:f64",
    body: "at::add(a, b, alpha)",
    doc: "a + alpha * b in one kernel.",
  },
  scalarOp("add_scalar", "at::add"),
  scalarOp("sub_scalar", "at::sub"),
  scalarOp("mul_scalar", "at::mul"),
  scalarOp("div_scalar", "at::div"),
  scalarOp("rsub_scalar", "at::rsub"),
  binary("eq"),
  binary("ne"),
  binary("lt"),
  binary("le"),
  binary("gt"),
  binary("ge"),
  scalarOp("eq_scalar", "at::eq"),
  scalarOp("lt_scalar", "at::lt"),
  scalarOp("le_scalar", "at::le"),
  scalarOp("gt_scalar", "at::gt"),
  scalarOp("ge_scalar", "at::ge"),
  binary("logical_and"),
  binary("logical_or"),
  { name: "where", args: "cond:T, a:T, b:T", body: "at::where(cond, a, b)" },
  { name: "masked_fill", args: "x:T, mask:T, value:f64", body: "at::masked_fill(x, mask, value)" },
  { name: "lerp", args: "a:T, b:T, weight:f64", body: "at::lerp(a, b, weight)" },

  // linear algebra
  binary("matmul"),
  binary("mm"),
  binary("bmm"),
  {
    name: "baddbmm",
    args: "input:T, b1:T, b2:T, beta:f64, alpha:f64",
    body: "at::baddbmm(input, b1, b2, beta, alpha)",
  },
  {
    name: "addmm",
    args: "input:T, m1:T, m2:T, beta:f64, alpha:f64",
    body: "at::addmm(input, m1, m2, beta, alpha)",
  },
  { name: "linear", args: "x:T, weight:T, bias:T?", body: "at::linear(x, weight, bias)" },
  {
    name: "conv2d",
    args: "x:T, weight:T, bias:T?, stride:int[], padding:int[], dilation:int[], groups:int",
    body: "at::conv2d(x, weight, bias, stride, padding, dilation, groups)",
  },
  {
    name: "sdpa",
    args: "q:T, k:T, v:T, mask:T?, dropout:f64, causal:bool, scale:f64?",
    body: "at::scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale)",
    doc: "scaled_dot_product_attention over [..., L, E] inputs.",
  },

  // normalisation, activation helpers, losses
  { name: "softmax", args: "x:T, dim:int", body: "at::softmax(x, dim)" },
  { name: "log_softmax", args: "x:T, dim:int", body: "at::log_softmax(x, dim)" },
  {
    name: "group_norm",
    args: "x:T, groups:int, weight:T?, bias:T?, eps:f64",
    body: "at::group_norm(x, groups, weight, bias, eps)",
  },
  {
    name: "layer_norm",
    args: "x:T, shape:int[], weight:T?, bias:T?, eps:f64",
    body: "at::layer_norm(x, shape, weight, bias, eps)",
  },
  { name: "dropout", args: "x:T, p:f64, train:bool", body: "at::dropout(x, p, train)" },
  { name: "embedding", args: "weight:T, ids:T", body: "at::embedding(weight, ids)" },
  {
    name: "cross_entropy",
    args: "logits:T, target:T, reduction:int, label_smoothing:f64",
    body: "at::cross_entropy_loss(logits, target, {}, reduction, -100, label_smoothing)",
    doc: "reduction: 0 none, 1 mean, 2 sum (at::Reduction).",
  },
  { name: "mse_loss", args: "a:T, b:T, reduction:int", body: "at::mse_loss(a, b, reduction)" },

  // shape and indexing
  { name: "reshape", args: "x:T, shape:int[]", body: "at::reshape(x, shape)" },
  { name: "permute", args: "x:T, dims:int[]", body: "at::permute(x, dims)" },
  { name: "transpose", args: "x:T, d0:int, d1:int", body: "at::transpose(x, d0, d1)" },
  { name: "contiguous", args: "x:T", body: "x.contiguous()" },
  { name: "unsqueeze", args: "x:T, dim:int", body: "at::unsqueeze(x, dim)" },
  { name: "squeeze", args: "x:T, dim:int", body: "at::squeeze(x, dim)" },
  { name: "flatten", args: "x:T, start:int, end:int", body: "at::flatten(x, start, end)" },
  { name: "expand", args: "x:T, shape:int[]", body: "x.expand(shape)" },
  { name: "repeat", args: "x:T, reps:int[]", body: "x.repeat(reps)" },
  {
    name: "slice",
    args: "x:T, dim:int, start:int, end:int, step:int",
    body: "at::slice(x, dim, start, end, step)",
  },
  {
    name: "narrow",
    args: "x:T, dim:int, start:int, length:int",
    body: "at::narrow(x, dim, start, length)",
  },
  { name: "select", args: "x:T, dim:int, index:int", body: "at::select(x, dim, index)" },
  { name: "index_select", args: "x:T, dim:int, index:T", body: "at::index_select(x, dim, index)" },
  { name: "gather", args: "x:T, dim:int, index:T", body: "at::gather(x, dim, index)" },
  { name: "cat", args: "xs:T[], dim:int", body: "at::cat(xs, dim)" },
  { name: "stack", args: "xs:T[], dim:int", body: "at::stack(xs, dim)" },
  {
    name: "chunk",
    args: "x:T, chunks:int, dim:int",
    ret: "T[]",
    body: "at::chunk(x, chunks, dim)",
  },
  {
    name: "split",
    args: "x:T, sizes:int[], dim:int",
    ret: "T[]",
    body: "at::split_with_sizes(x, sizes, dim)",
  },
  { name: "flip", args: "x:T, dims:int[]", body: "at::flip(x, dims)" },
  { name: "tril", args: "x:T, diagonal:int", body: "at::tril(x, diagonal)" },
  { name: "triu", args: "x:T, diagonal:int", body: "at::triu(x, diagonal)" },
  {
    name: "pad",
    args: "x:T, pads:int[], mode:int, value:f64",
    stmts: `static const char* modes[] = {"constant", "reflect", "replicate", "circular"};
    TORCH_CHECK(mode >= 0 && mode < 4, "pad: mode must be 0..3, got ", mode);
    return at::pad(x, pads, modes[mode], mode == 0 ? std::optional<double>(value) : std::nullopt);`,
    doc: "mode: 0 constant, 1 reflect, 2 replicate, 3 circular.",
  },
  {
    name: "upsample_nearest2d",
    args: "x:T, height:int, width:int",
    body: "at::upsample_nearest2d(x, {height, width})",
  },
  {
    name: "interpolate",
    args: "x:T, height:int, width:int, mode:int, align_corners:bool, antialias:bool",
    stmts: `std::vector<int64_t> size{height, width};
    switch (mode) {
      case 0:
        TORCH_CHECK(!antialias, "interpolate: antialias has no meaning for nearest mode");
        return at::upsample_nearest2d(x, size);
      case 1: return antialias ? at::_upsample_bilinear2d_aa(x, size, align_corners)
                               : at::upsample_bilinear2d(x, size, align_corners);
      case 2: return antialias ? at::_upsample_bicubic2d_aa(x, size, align_corners)
                               : at::upsample_bicubic2d(x, size, align_corners);
      default: TORCH_CHECK(false, "interpolate: mode must be 0 (nearest), 1 (bilinear) or 2 (bicubic), got ", mode);
    }`,
    doc: "Resize [N, C, H, W]; mode: 0 nearest, 1 bilinear, 2 bicubic.",
  },

  // reductions
  reduceDims("sum", "at::sum"),
  reduceDims("mean", "at::mean"),
  reduceDims("amax", "at::amax"),
  reduceDims("amin", "at::amin"),
  reduceDims("logsumexp", "at::logsumexp"),
  unary("sum_all", "at::sum"),
  unary("mean_all", "at::mean"),
  unary("max_all", "at::max"),
  unary("min_all", "at::min"),
  unary("all", "at::all"),
  unary("any", "at::any"),
  { name: "argmax", args: "x:T, dim:int, keepdim:bool", body: "at::argmax(x, dim, keepdim)" },
  {
    name: "variance",
    args: "x:T, dims:int[], correction:f64, keepdim:bool",
    body: "at::var(x, at::OptionalIntArrayRef(dims), at::Scalar(correction), keepdim)",
  },
  {
    name: "norm",
    args: "x:T, p:f64, dims:int[], keepdim:bool",
    body: "at::linalg_vector_norm(x, p, at::OptionalIntArrayRef(dims), keepdim)",
  },
  { name: "cumsum", args: "x:T, dim:int", body: "at::cumsum(x, dim)" },
  { name: "cumprod", args: "x:T, dim:int", body: "at::cumprod(x, dim)" },

  // dtype, device, copies
  {
    name: "to",
    args: "x:T, dtype:dtype, device:device",
    body:
      "x.to(device_of(device, x), dtype < 0 ? x.scalar_type() : static_cast<at::ScalarType>(dtype))",
    doc: "Cast and/or move; dtype -1 keeps the dtype.",
  },
  { name: "clone", args: "x:T", body: "x.clone()" },
  { name: "detach", args: "x:T", body: "x.detach()" },
  { name: "item", args: "x:T", ret: "f64", body: "x.item<double>()" },

  // in-place (return nothing; the handle keeps pointing at the mutated tensor)
  {
    name: "copy_",
    args: "dst:T, src:T",
    ret: "void",
    body: "const_cast<at::Tensor&>(dst).copy_(src)",
  },
  {
    name: "fill_",
    args: "x:T, value:f64",
    ret: "void",
    body: "const_cast<at::Tensor&>(x).fill_(value)",
  },
  {
    name: "add_",
    args: "x:T, y:T, alpha:f64",
    ret: "void",
    body: "const_cast<at::Tensor&>(x).add_(y, alpha)",
  },
  {
    name: "mul_scalar_",
    args: "x:T, s:f64",
    ret: "void",
    body: "const_cast<at::Tensor&>(x).mul_(dt::wrapped_scalar(s))",
    doc: "x *= s, with s kept in double precision as Python's `x.mul_(s)` does.",
  },

  // autograd
  {
    name: "requires_grad_",
    args: "x:T, on:bool",
    ret: "void",
    body: "const_cast<at::Tensor&>(x).requires_grad_(on)",
  },
  {
    name: "backward",
    args: "x:T, grad:T?",
    ret: "void",
    stmts: `c10::AutoGradMode enable(true);
    x.backward(grad.has_value() ? *grad : at::Tensor());`,
    doc: "Backpropagates from x (a scalar unless grad is given); always runs with grad enabled.",
  },
  {
    name: "grad",
    args: "x:T",
    ret: "T?",
    body: "x.grad()",
    doc: "The accumulated gradient, or null when none has been computed.",
  },
  {
    name: "zero_grad",
    args: "x:T",
    ret: "void",
    body: "const_cast<at::Tensor&>(x).mutable_grad().reset()",
    doc: "Drops the accumulated gradient (like PyTorch's zero_grad(set_to_none=True)).",
  },
  {
    name: "adamw_step",
    args:
      "param:T, grad:T, exp_avg:T, exp_avg_sq:T, step:int, lr:f64, beta1:f64, beta2:f64, eps:f64, weight_decay:f64",
    ret: "void",
    stmts:
      `// The exact op sequence of torch.optim.AdamW's single-tensor path, so results match bit for bit.
    c10::AutoGradMode no_grad(false);
    auto& p = const_cast<at::Tensor&>(param);
    auto& m = const_cast<at::Tensor&>(exp_avg);
    auto& v = const_cast<at::Tensor&>(exp_avg_sq);
    // Python floats reach in-place ops as wrapped double tensors; a C++ Scalar would be rounded
    // to the tensor's dtype first (visible in f16), hence dt::wrapped_scalar.
    if (weight_decay != 0) p.mul_(dt::wrapped_scalar(1 - lr * weight_decay));
    m.lerp_(grad, 1 - beta1);
    v.mul_(dt::wrapped_scalar(beta2)).addcmul_(grad, grad, 1 - beta2);
    const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
    const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    auto denom = (v.sqrt() / dt::wrapped_scalar(bias_correction2_sqrt)).add_(dt::wrapped_scalar(eps));
    p.addcdiv_(m, denom, -step_size);`,
    doc: "One AdamW update in place (step counts from 1).",
  },

  // fused (native/src/fused.cpp): what always runs together in the UNet and the VAE, in one call
  {
    name: "attention",
    args:
      "x:T, context:T?, w_q:T, w_k:T, w_v:T, w_out:T, b_out:T?, heads:int, ip_tokens:T[], ip_weights:T[], ip_scales:T[], residual:T?",
    body:
      "dt::attention(x, context, w_q, w_k, w_v, w_out, b_out, heads, ip_tokens, ip_weights, ip_scales, residual)",
    doc:
      "diffusers' Attention (SDPA processor, bias-free q/k/v) over x [B, L, C], attending to context (null: x itself), then + residual when given. Per IP-Adapter a: ip_tokens[a] [B, T, D], ip_weights[2a] / [2a + 1] its to_k_ip / to_v_ip, ip_scales[a] [B, 1, 1]; each adds scale * its own attention before the output projection.",
  },
  {
    name: "geglu_feed_forward",
    args: "x:T, w_in:T, b_in:T?, w_out:T, b_out:T?, residual:T?",
    body: "dt::geglu_feed_forward(x, w_in, b_in, w_out, b_out, residual)",
    doc:
      "diffusers' FeedForward with GEGLU: (h, gate) = linear(x, w_in, b_in).chunk(2, -1); linear(h * gelu(gate), w_out, b_out), then + residual when given.",
  },
  {
    name: "resnet_block",
    args:
      "x:T, temb:T?, norm1_w:T, norm1_b:T, conv1_w:T, conv1_b:T?, temb_w:T?, temb_b:T?, norm2_w:T, norm2_b:T, conv2_w:T, conv2_b:T?, shortcut_w:T?, shortcut_b:T?, groups:int, eps:f64, act:int, output_scale:f64",
    body:
      "dt::resnet_block(x, temb, norm1_w, norm1_b, conv1_w, conv1_b, temb_w, temb_b, norm2_w, norm2_b, conv2_w, conv2_b, shortcut_w, shortcut_b, groups, eps, act, output_scale)",
    doc:
      "diffusers' ResnetBlock2D (default time-embedding norm): norm1, act, conv1, + temb_w act(temb) per channel (temb null: none), norm2, act, conv2, + x (through the 1x1 shortcut when given), / output_scale. Convs keep the size (padding = kernel / 2); act: 0 silu, 1 gelu, 2 relu.",
  },
  {
    name: "image_to_tokens",
    args: "x:T",
    body: "dt::image_to_tokens(x)",
    doc: "[B, C, H, W] -> [B, H*W, C] (permute, reshape).",
  },
  {
    name: "tokens_to_image",
    args: "x:T, height:int, width:int",
    body: "dt::tokens_to_image(x, height, width)",
    doc: "[B, H*W, C] -> contiguous [B, C, H, W] (reshape, permute, contiguous).",
  },
];
