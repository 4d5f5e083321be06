/**
 * dipsy: synthetic few-shot training data with dual IP-Adapter guidance (DIPSY) on Stable
 * Diffusion 1.5, and a CLIP ViT-B/16 LoRA classifier, on libtorch through Deno FFI.
 *
 * This module re-exports the public API.
 */
export * from "./ffi/mod.ts";
export * from "./core/weights.ts";
export * from "./core/nn.ts";
