/**
 * Layers the UNet and the VAE share, as diffusers shares them: `ResnetBlock2D` (with or without
 * a time embedding), `Downsample2D`, `Upsample2D` and the activation switch.
 *
 * A block's temporaries are freed as soon as it returns (the resnet runs as one native op, the
 * resamplers free their intermediate at once), which at 512 px (VAE decoder activations of
 * hundreds of MB) bounds peak memory.
 */
import { Conv2d, GroupNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import { ops, type Tensor } from "../../ffi/mod.ts";

/** diffusers' `get_activation` names ("swish" is silu, as in VAE configs). */
export type Activation = "silu" | "swish" | "gelu" | "relu";

export function activation(x: Tensor, fn: Activation): Tensor {
  switch (fn) {
    case "silu":
    case "swish":
      return ops.silu(x);
    case "gelu":
      return ops.gelu(x, false);
    case "relu":
      return ops.relu(x);
  }
}

/** The fused ops' activation codes (native/ops_spec.ts, resnet_block). */
const ACTIVATION_CODE: Record<Activation, number> = { silu: 0, swish: 0, gelu: 1, relu: 2 };

export interface ResnetOptions {
  groups: number;
  eps: number;
  act: Activation;
  /** Width of the time embedding; null: no time conditioning (the VAE's resnets). */
  tembChannels: number | null;
  outputScaleFactor?: number;
}

/**
 * `ResnetBlock2D`: pre-norm, two 3x3 convs, the time embedding ("default" conditioning) added
 * after the first, and a 1x1 shortcut when the widths differ.
 */
export class ResnetBlock2D extends Module {
  readonly norm1: GroupNorm;
  readonly conv1: Conv2d;
  readonly time_emb_proj: Linear | null;
  readonly norm2: GroupNorm;
  readonly conv2: Conv2d;
  readonly conv_shortcut: Conv2d | null;
  readonly act: Activation;
  readonly outputScaleFactor: number;

  constructor(w: WeightSource, cin: number, cout: number, o: ResnetOptions) {
    super();
    this.act = o.act;
    this.outputScaleFactor = o.outputScaleFactor ?? 1;
    this.norm1 = this.child("norm1", new GroupNorm(w.sub("norm1"), o.groups, cin, o.eps));
    this.conv1 = this.child("conv1", new Conv2d(w.sub("conv1"), cin, cout, 3, { padding: 1 }));
    this.time_emb_proj = o.tembChannels === null ? null : this.child(
      "time_emb_proj",
      new Linear(w.sub("time_emb_proj"), o.tembChannels, cout),
    );
    this.norm2 = this.child("norm2", new GroupNorm(w.sub("norm2"), o.groups, cout, o.eps));
    this.conv2 = this.child("conv2", new Conv2d(w.sub("conv2"), cout, cout, 3, { padding: 1 }));
    this.conv_shortcut = cin === cout
      ? null
      : this.child("conv_shortcut", new Conv2d(w.sub("conv_shortcut"), cin, cout, 1));
  }

  forward(x: Tensor, temb?: Tensor): Tensor {
    const proj = this.time_emb_proj, shortcut = this.conv_shortcut;
    if (proj && !temb) throw new Error("ResnetBlock2D: this block needs a time embedding");
    return ops.resnetBlock(
      x,
      proj ? temb : null,
      this.norm1.weight,
      this.norm1.bias,
      this.conv1.weight,
      this.conv1.bias,
      proj?.weight,
      proj?.bias,
      this.norm2.weight,
      this.norm2.bias,
      this.conv2.weight,
      this.conv2.bias,
      shortcut?.weight,
      shortcut?.bias,
      this.norm1.groups,
      this.norm1.eps,
      ACTIVATION_CODE[this.act],
      this.outputScaleFactor,
    );
  }
}

/**
 * `Downsample2D` with a conv: stride 2. Built with padding 0 (the VAE's), it pads one zero
 * row/column at the bottom/right first, so odd sizes round up as the original LDM code did.
 */
export class Downsample2D extends Module {
  readonly conv: Conv2d;

  constructor(w: WeightSource, channels: number, readonly padding: number) {
    super();
    this.conv = this.child(
      "conv",
      new Conv2d(w.sub("conv"), channels, channels, 3, { stride: 2, padding }),
    );
  }

  forward(x: Tensor): Tensor {
    if (this.padding !== 0) return this.conv.forward(x);
    using padded = ops.pad(x, [0, 1, 0, 1], 0, 0);
    return this.conv.forward(padded);
  }
}

/** `Upsample2D` with a conv: nearest 2x (or to the skip's size), then a 3x3 conv. */
export class Upsample2D extends Module {
  readonly conv: Conv2d;

  constructor(w: WeightSource, channels: number) {
    super();
    this.conv = this.child(
      "conv",
      new Conv2d(w.sub("conv"), channels, channels, 3, { padding: 1 }),
    );
  }

  forward(x: Tensor, size?: readonly [number, number]): Tensor {
    const [h, w] = size ?? [x.size(2) * 2, x.size(3) * 2];
    using up = ops.upsampleNearest2d(x, h, w);
    return this.conv.forward(up);
  }
}
