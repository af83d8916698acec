"""Upload to the Hugging Face Hub (``hub_model_id``, ``hub_strategy``, ``hub_private_repo``, ``hub_revision``).

Before training, on the main process: a token must exist (``HF_TOKEN`` or ``hf auth login``), the
endpoint must accept it (``whoami``), it must not be read-only, and the repo (and branch) must be
creatable or writable. Any failure stops the run before weights load, on every process.
``HF_ENDPOINT`` is read when the upload is prepared, so a stand-in server can be named at run time.

What goes up (``hub_strategy``, as in transformers' Trainer):

* every strategy: at the end, ``output_dir`` without its checkpoints and per-sample logs: the model
  or adapter, tokenizer, run card (``README.md``), ``config.yaml``, ``metrics.jsonl`` and, with
  ``merge_lora``, ``merged/``;
* ``every_save`` (default): also the weights, configs and tokenizer of every checkpoint, at the repo root;
* ``checkpoint``: also the latest whole checkpoint (optimizer and RNG states too) as ``last-checkpoint/``;
* ``all_checkpoints``: also every whole checkpoint as ``checkpoint-N/``.

Every upload is a view of the folder with local absolute paths rewritten (``deploy.redact``): the
config, cards and adapter configs name ``<local>/NAME`` instead of this machine's folders. The output
folder's lock file (``.ebft.lock``: a PID and a host name) is never uploaded.

Uploads run in the training process and block it while they run. A failed checkpoint upload is a
warning (training goes on); a failed final upload is an error that says how to retry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ebft.config import TrainConfig
from ebft.config.deploy import uploads
from ebft.deploy.redact import Redactor, local_roots, redacted_view
from ebft.errors import ConfigError, EbftError
from ebft.train.batches import reduce_sum
from ebft.train.lock import LOCK_FILE

log = logging.getLogger("ebft")

# Never uploaded from output_dir at the end: checkpoints have their own strategy, the rest is per-sample data.
FINAL_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.tmp/**", "rollouts.jsonl", "completions.jsonl", LOCK_FILE]
# A checkpoint's training state (optimizer, scheduler, RNG, rollout buffer, step, config, manifest) and PEFT's
# placeholder card.
STATE_FILES = ["*.pt", "trainer_state.json", "train_config.json", "manifest.json", "README.md"]


class HubUpload:
    """Uploads to one checked repo; built by :func:`prepare_upload`."""

    def __init__(self, api, repo_id: str, strategy: str, revision: str | None, redactor: Redactor | None = None):
        self.api, self.repo_id, self.strategy, self.revision = api, repo_id, strategy, revision
        self.redactor = redactor or Redactor(local_roots(None))

    def _upload(self, folder: Path, message: str, **kwargs) -> None:
        with redacted_view(folder, self.redactor) as view:
            self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(view),
                commit_message=message,
                revision=self.revision,
                **kwargs,
            )

    def checkpoint(self, path: Path) -> None:
        """After ``path`` (a checkpoint-N folder) was saved: upload what the strategy asks for."""
        if self.strategy == "end":
            return
        try:
            self._upload(path, f"ebft: weights of {path.name}", ignore_patterns=STATE_FILES)
            if self.strategy == "checkpoint":
                self._upload(path, f"ebft: {path.name} as last-checkpoint", path_in_repo="last-checkpoint")
            elif self.strategy == "all_checkpoints":
                self._upload(path, f"ebft: {path.name}", path_in_repo=path.name)
        except Exception as exc:  # a network or server failure must not end the run; the files stay local
            log.warning(
                "hub: uploading %s to %s failed (%s: %s); training goes on",
                path.name,
                self.repo_id,
                type(exc).__name__,
                exc,
            )

    def final(self, out_dir: Path) -> None:
        """Upload the finished run (see the module docstring); raises EbftError with the retry command."""
        try:
            self._upload(out_dir, "ebft: final model and run card", ignore_patterns=FINAL_IGNORE)
        except Exception as exc:
            excluded = " ".join(f"--exclude '{p}'" for p in FINAL_IGNORE)
            raise EbftError(
                f"hub: uploading {out_dir} to {self.repo_id} failed ({type(exc).__name__}: {exc}); the run is saved "
                f"in {out_dir}. Retry with: hf upload {self.repo_id} {out_dir} . {excluded} (this uploads the "
                "files as they are, local paths in config.yaml and the cards included)"
            ) from exc
        log.info("hub: uploaded %s to %s", out_dir, self.repo_id)


def prepare_upload(cfg: TrainConfig, accelerator) -> HubUpload | None:
    """The run's uploader after checking credentials and the repo (main process), or None without uploads.

    Every process learns whether the main process's checks passed, so none of them goes on alone.
    """

    if not uploads(cfg):
        return None
    upload, failure = None, None
    if accelerator.is_main_process:
        try:
            upload = _checked_upload(cfg)
        except ConfigError as exc:
            failure = exc
    if accelerator.num_processes > 1:
        failed = reduce_sum(accelerator, torch.tensor([float(failure is not None)], device=accelerator.device))
        if failed.item() > 0 and failure is None:
            failure = ConfigError("hub_model_id: the Hub checks failed on the main process (see its error)")
    if failure is not None:
        raise failure
    return upload


def _checked_upload(cfg: TrainConfig) -> HubUpload:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    hub_model_id = cfg.hub_model_id
    if hub_model_id is None:
        raise ConfigError("hub_model_id: not set; the Hub upload needs the repo id to upload to")

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    token = get_token()
    if token is None:
        raise ConfigError(
            f"hub_model_id: uploading to {cfg.hub_model_id!r} needs a Hugging Face token with write access: set "
            "HF_TOKEN or run `hf auth login` (or set push_to_hub: false to train without uploading)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise ConfigError(f"hub_model_id: {endpoint} rejected the Hugging Face token (HTTP 401): {exc}") from exc
        raise ConfigError(f"hub_model_id: cannot check the token at {endpoint}: {exc}") from exc
    except Exception as exc:  # the HTTP client's own connection errors
        raise ConfigError(f"hub_model_id: cannot reach {endpoint} ({type(exc).__name__}: {exc})") from exc
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConfigError(f"hub_model_id: the token of {who.get('name')!r} is read-only; create one with write access")
    repo_id = hub_model_id if "/" in hub_model_id else f"{who['name']}/{hub_model_id}"
    try:
        api.create_repo(repo_id, private=cfg.hub_private_repo, exist_ok=True)
        if cfg.hub_revision is not None:
            api.create_branch(repo_id, branch=cfg.hub_revision, exist_ok=True)
    except HfHubHTTPError as exc:
        raise ConfigError(
            f"hub_model_id: {who.get('name')!r} cannot create or write {repo_id!r} at {endpoint}: {exc}"
        ) from exc
    log.info("hub: uploads go to %s/%s (%s)", endpoint, repo_id, cfg.hub_strategy)
    return HubUpload(api, repo_id, cfg.hub_strategy, cfg.hub_revision, Redactor(local_roots(cfg)))
