"""Publishing an output on the Hugging Face Hub through huggingface_hub (`--push-to-hub`, `output.push_to_hub`)."""

from __future__ import annotations

from pathlib import Path

from .errors import first_line

NOT_PUSHED = [".*", "checkpoints/*", "trackers/*", "metrics.jsonl"]  # bookkeeping of a run, not the model


def check_repo_id(repo_id: str, setting: str, error: type[Exception]) -> None:
    """Refuse, before any work, a repository name the hub would refuse after it (`setting` names the option)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise error(f"{setting} {repo_id!r} is not a hub repository name ({first_line(exc).split(': ', 1)[-1]}); "
                    f"write NAME or ORG/NAME") from None


def push_folder(folder: Path, repo_id: str, private: bool, message: str, error: type[Exception]) -> str:
    """Create `repo_id` (private if asked; an existing repository is kept) and upload `folder` in one commit;
    returns the commit's URL. A failure is `error(one line)`: the local output is complete either way."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message,
                                   ignore_patterns=NOT_PUSHED)
    except Exception as exc:  # auth, network, a name the hub refuses: all reported the same way
        fix = "with the hub reachable (HF_HUB_OFFLINE unset)" if "Offline" in type(exc).__name__ else \
            "logged in (hf auth login), with the hub reachable"
        raise error(f"{folder} is complete, but pushing it to the hub as {repo_id} failed ({first_line(exc)}); "
                    f"{fix}, run: hf upload {repo_id} {folder}") from None
    return str(getattr(commit, "commit_url", commit))
