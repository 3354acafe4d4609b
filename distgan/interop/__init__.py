"""Foreign checkpoints come in through one door: `distgan import PKL --out DIR`.

- `safe_pickle`: a restricted unpickler that turns a network pickle into plain records (tensors,
  numbers, dicts) and refuses any other global before it runs; the reference's code is never
  imported and the source a pickle embeds is never executed;
- `stylegan2_ada`: NVlabs stylegan2-ada-pytorch records -> distgan `stylegan2` config and state
  dicts, by name (StyleGAN3 and what config F does not cover are refused, naming why);
- `importer`: `import_pickle`, which writes an ordinary distgan export (`distgan.export.folder`)
  with G, D and G_ema, for `distgan sample` and `train.init_from`.
"""
