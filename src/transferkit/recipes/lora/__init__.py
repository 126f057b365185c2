"""LoRA: low-rank adapters on Keras' own `enable_lora`, adapter-only files, merged saves.

`enable_lora(rank)` (Keras 3.15: Dense, EinsumDense, Embedding, Conv1D/2D/3D) freezes a layer's
kernel and adds two trainable matrices A (in x rank) and B (rank x out, zeros at first); the layer
then computes with `kernel + (alpha / rank) * A @ B`. Three Keras behaviours shape this package:

- `enable_lora` freezes only the kernel: the bias would keep training, and an adapter file without
  it could not restore predictions. transferkit freezes the bias too.
- `Layer.trainable = x` sets `trainable` on every variable of the layer, so toggling a LoRA layer
  afterwards unfreezes its base kernel. Order: freeze all, make the targets trainable, enable
  LoRA, freeze the bias; never touch the flags again (`check_flags_editable`).
- A LoRA model saved as `.h5` does not reload (the saved config re-enables LoRA and the weight
  count no longer matches); a `.keras` file reloads with merged kernels but A and B reset to zero.
  `merged_copy` builds a plain model with the adapters merged into the kernels.

The modules, bottom up (each imports only those before it):

- `config`: `LoraConfig`, what `FineTuner.lora` did, and the adapter file's format constants.
- `paths`: the model tree: every layer by its path (nested models, layers, sublayers of custom
  layers) and every variable by its key (`base/fc1/lora_kernel_a`).
- `apply`: resolving `targets=` to layers, enabling LoRA, the trainable flags around it, and which
  layers carry LoRA.
- `adapters`: adapter files. `.npz` archives: one array per variable, keyed by its path in the
  model, and a JSON header (`__transferkit__`) with the rank, alpha, targets, head and one
  SHA-256 fingerprint per base variable, so that loading into a different base names the first
  variable that differs.
- `merge`: `merged_copy`, a plain model with every update merged into its kernel.
"""
