"""`distgan export`: a trained generator as a folder to share, in the layout the Hugging Face Hub
expects (`model.safetensors`, `config.json`, `README.md` model card, a sample grid).

- `folder`: the files of an export and reading them back (`weights.open_weights` uses it);
- `card`: the README model card and the training data's license and attribution;
- `build`: `export_run`, which writes an export from a checkpoint or run folder;
- `hub`: `--push REPO_ID` through `huggingface_hub`, refused before any work without credentials.

This package file imports nothing: `distgan.weights` reads exports through `folder`, and
`sampling` (which `build` uses) reads weights through `distgan.weights`.
"""
