/**
 * Layers the UNet and the VAE share, as diffusers shares them: `ResnetBlock2D` (with or without
 * a time embedding), `Downsample2D`, `Upsample2D` and the activation switch.
 *
 * Each forward runs in its own memory scope: a block's temporaries are freed as soon as it
 * returns, which at 512 px (VAE decoder activations of hundreds of MB) bounds peak memory.
 */
import { Conv2d, GroupNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import { ops, scope, type Tensor } from "../../ffi/mod.ts";

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
    return scope(() => {
      let h = this.conv1.forward(activation(this.norm1.forward(x), this.act));
      if (this.time_emb_proj) {
        if (!temb) throw new Error("ResnetBlock2D: this block needs a time embedding");
        const t = this.time_emb_proj.forward(activation(temb, this.act));
        h = h.add(ops.unsqueeze(ops.unsqueeze(t, -1), -1));
      }
      h = this.conv2.forward(activation(this.norm2.forward(h), this.act));
      const skip = this.conv_shortcut ? this.conv_shortcut.forward(x) : x;
      const out = skip.add(h);
      return this.outputScaleFactor === 1 ? out : out.div(this.outputScaleFactor);
    });
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
    return scope(() => this.conv.forward(this.padding === 0 ? ops.pad(x, [0, 1, 0, 1], 0, 0) : x));
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
    return scope(() => {
      const [h, w] = size ?? [x.size(2) * 2, x.size(3) * 2];
      return this.conv.forward(ops.upsampleNearest2d(x, h, w));
    });
  }
}
