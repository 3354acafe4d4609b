"""`distgan export --push REPO_ID`: upload an export folder to the Hugging Face Hub as it is.

`check_push` runs before the export is written: without `huggingface_hub` or without
credentials (HF_TOKEN, or the token file `hf auth login` writes) it refuses in one line and
nothing is sent anywhere. Only `push` talks to the Hub (it creates the repo if needed).
"""

from __future__ import annotations

import re
from pathlib import Path

from distgan.errors import DistganError
from distgan.optional import require

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PushError(DistganError):
    """An export cannot be pushed as asked (no credentials, a malformed repo id)."""

    label = "push refused"


def check_push(repo_id: str) -> None:
    """PushError (or MissingDependencyError) unless `push(folder, repo_id)` can be attempted."""
    if not REPO_ID.match(repo_id):
        raise PushError(f"--push {repo_id!r}: a Hub repo id looks like OWNER/NAME (e.g. alice/emoji-dcgan).")
    hub = require("huggingface_hub", "distgan export --push")
    if not hub.get_token():
        raise PushError(f"--push {repo_id}: no Hugging Face credentials found (set HF_TOKEN, or run `hf auth login`); "
                        "nothing was exported or uploaded. Without --push the export folder can be uploaded later "
                        "with `hf upload REPO_ID FOLDER`.")


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` (a model repo) if needed and upload `folder`; returns the commit URL."""
    check_push(repo_id)
    hub = require("huggingface_hub", "distgan export --push")
    api = hub.HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message="Upload distgan export")
    return str(getattr(commit, "commit_url", commit))


__all__ = ["PushError", "check_push", "push"]
