"""The training loop: token-budget batches, label-smoothed loss, accumulation, clipping, validation,
best/last checkpoints, early stopping, exact resume, and a log.jsonl of every logged step.

Under torchrun the same loop runs in every process (DistributedDataParallel, see
nmt/training/distributed.py and docs/distributed.md): rank r takes batches r, r + N, ... of each
epoch's batch list (cut to a multiple of N, so every rank takes the same number of steps), the loss
is normalized by the target tokens of all ranks together, every decision (skip a non-finite update,
stop on a signal or a time limit, early stopping) is taken from all-reduced values so that all ranks
agree, validation is sharded across ranks, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nmt.config import Config, dump_config, to_dict
from nmt.data.batching import collate, token_batches
from nmt.data.dataset import ParallelData, open_training_data, read_text
from nmt.data.tokenizer import Tokenizer
from nmt.device import resolve_device
from nmt.errors import NmtError
from nmt.evaluation import bleu
from nmt.inference.translator import decode_ids
from nmt.io import write_atomic
from nmt.models.zoo import build_model
from nmt.training.checkpoint import load_checkpoint, save_checkpoint
from nmt.training.distributed import Distributed, setup
from nmt.training.loss import label_smoothed_nll, output_label_smoothed_nll
from nmt.training.optim import build_optimizer, build_scheduler, clip_gradients
from nmt.training.precision import autocast, make_grad_scaler, resolve_precision

MAX_NONFINITE_IN_A_ROW = 5
HIGHER_IS_BETTER = {"bleu": True, "loss": False, "ppl": False}


@dataclass
class TrainState:
    """Counters that, with the model/optimizer/schedule/RNG states, define where training is."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best: float | None = None
    bad_validations: int = 0
    nonfinite_in_a_row: int = 0
    skipped_updates: int = 0
    elapsed: float = 0.0  # training wall time in seconds, across resumes
    world_size: int = 1  # processes that shared each step (batch_in_epoch counts one rank's batches)
    history: list[dict] = field(default_factory=list)  # validation results


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between updates (checkpoint, then exit cleanly)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class CollectiveError(NmtError):
    """An error every rank raises at the same point (rank 0 reports it; the others exit quietly)."""


class Trainer:
    """Owns one training run in `cfg.train.run_dir` (one process of it, under torchrun)."""

    def __init__(self, cfg: Config, device: str = "auto", resume: bool = False, force: bool = False,
                 quiet: bool = False, dist: Distributed | None = None):
        self.cfg = cfg
        self.dist = dist or Distributed()
        self.quiet = quiet or not self.dist.is_main
        self.device = resolve_device(device)
        self.run_dir = Path(cfg.train.run_dir)
        self.data_dir = Path(cfg.data.dir)
        if not cfg.train.run_dir:
            raise NmtError("train.run_dir: required key is missing")
        # the plain segmentation, then any sampled ones (data.sampling): epoch e reads number e % their count
        self.train_sets = open_training_data(self.data_dir)
        self.valid_data = ParallelData.open(self.data_dir, "valid")
        self.valid_refs = read_text(self.data_dir, "valid", "tgt")
        self.src_tok = Tokenizer.load(self.data_dir / "spm.src.model")
        self.tgt_tok = Tokenizer.load(self.data_dir / "spm.tgt.model")
        self.precision = resolve_precision(cfg.train.precision, self.device)

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, self.src_tok.vocab_size, self.tgt_tok.vocab_size).to(self.device)
        if self.dist.rank > 0:  # same initial weights everywhere, but each rank draws its own dropout masks
            torch.manual_seed(cfg.train.seed + 1_000_003 * self.dist.rank)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.train.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.schedule, cfg.train.max_steps)
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.state = TrainState(world_size=self.dist.world_size)
        self._prepare_run_dir(resume, force)
        self.ddp: torch.nn.Module | None = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # our models change no buffer while training (no batch norm): skip the per-forward buffer sync
            params = inspect.signature(DistributedDataParallel).parameters
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else \
                {"broadcast_buffers": False}
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None, **no_sync)

    # -- run directory -------------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool, force: bool) -> None:
        last = self.run_dir / "last.pt"
        if resume and force:
            raise NmtError("--resume and --force contradict each other: choose one")
        if resume:
            if not last.exists():
                raise NmtError(f"{last}: nothing to resume (no last.pt in the run directory)")
            self._restore(load_checkpoint(last, map_location=self.device))
            return
        self.dist.on_main(lambda: self._new_run_dir(force))

    def _new_run_dir(self, force: bool) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not force:
                raise NmtError(
                    f"{self.run_dir}: run directory is not empty (use --resume to continue it, "
                    "or --force to start over)"
                )
            shutil.rmtree(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))
            for side in ("src", "tgt"):
                shutil.copyfile(self.data_dir / f"spm.{side}.model", self.run_dir / f"spm.{side}.model")
        except OSError as e:
            raise NmtError(f"{self.run_dir}: cannot write the run directory ({e.strerror})") from None

    def _payload(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "src_vocab_size": self.src_tok.vocab_size,
            "tgt_vocab_size": self.tgt_tok.vocab_size,
            "vocab": {"src": self.src_tok.fingerprint, "tgt": self.tgt_tok.fingerprint},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "train_state": to_dict(self.state),
            "rng": self._rng_state(),
        }

    def _rng_state(self) -> dict[str, Any]:
        if self.dist.enabled:  # one process, one GPU
            cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        else:
            cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"].cpu())
        if self.device.type == "cuda" and rng.get("cuda"):
            if self.dist.enabled:
                torch.cuda.set_rng_state(rng["cuda"][0].cpu(), self.device)
            else:
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def _save(self, name: str) -> None:
        """Write checkpoint `name` (rank 0; every rank must call this, it gathers their RNG states)."""
        rng_ranks = self.dist.all_gather(self._rng_state()) if self.dist.enabled else None

        def write() -> None:
            payload = self._payload()
            if rng_ranks is not None:
                payload["rng_ranks"] = [{"torch": r["torch"].cpu(), "cuda": [s.cpu() for s in r["cuda"]]}
                                        for r in rng_ranks]
            try:
                save_checkpoint(self.run_dir / name, payload)
            except OSError as e:
                raise NmtError(f"{self.run_dir / name}: cannot write checkpoint ({e.strerror})") from None

        try:
            self.dist.on_main(write)
        except NmtError as e:
            raise (CollectiveError(str(e)) if self.dist.enabled and not self.dist.is_main else e) from None

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("vocab") != {"src": self.src_tok.fingerprint, "tgt": self.tgt_tok.fingerprint}:
            raise NmtError(f"{self.run_dir}: the data directory's SentencePiece models differ from the run's")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise NmtError(f"{self.run_dir / 'last.pt'}: the checkpoint does not fit the configured model") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        if self.dist.is_main:
            self._truncate_log(self.state.step)
        ranks = ckpt.get("rng_ranks") or []
        if self.dist.enabled and len(ranks) == self.dist.world_size:
            self._set_rng_state(ranks[self.dist.rank])
        else:
            self._set_rng_state(ckpt["rng"])
            if self.dist.rank > 0:  # a checkpoint of another number of processes: fresh, distinct streams
                torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.dist.rank + self.state.step)
        saved_world = self.state.world_size
        if saved_world != self.dist.world_size:
            # batch_in_epoch counts one rank's batches: convert it through the batches all ranks consumed
            self.state.batch_in_epoch = self.state.batch_in_epoch * saved_world // self.dist.world_size
            self.state.world_size = self.dist.world_size
            self._say(f"resuming a run of {saved_world} process(es) with {self.dist.world_size}: the effective "
                      f"batch changes, and the current epoch continues at about the same position")

    def _truncate_log(self, step: int) -> None:
        """Drop log records written after `step` (by a run that died after its last checkpoint)."""
        log = self.run_dir / "log.jsonl"
        if not log.exists():
            return
        kept = []
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_atomic(log, "".join(line + "\n" for line in kept))
        for stale in self.run_dir.glob(".*.tmp"):  # checkpoints that were being written when the run died
            stale.unlink(missing_ok=True)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- one update ------------------------------------------------------------------------------

    def _update(self, batches: list[Any]) -> tuple[float, float, int, int]:
        """Forward/backward `batches` (accumulated) and step the optimizer.

        Returns (loss per token, nll per token, target tokens, source tokens).
        Under DDP, `batches` are this rank's share of the step and the returned values cover all ranks.
        The loss is normalized by the target tokens of all ranks (all-reduced before the backward pass)
        and multiplied by the number of ranks, because DDP averages the gradients: the update is then
        the one a single process would make on the union of every rank's batches.
        """
        self.model.train()
        model = self.ddp if self.ddp is not None else self.model
        world = self.dist.world_size
        n_tokens, n_src = self.dist.all_reduce_sum([sum(b.n_tgt_tokens for b in batches),
                                                    sum(b.n_src_tokens for b in batches)])
        n_tokens, n_src = int(n_tokens), int(n_src)
        losses, nlls = [], []
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1  # DDP all-reduces the gradients during the last backward only
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with autocast(self.precision, self.device):
                    # the output layer and the loss in one blocked op: the [N, V] logits are never stored
                    features = model(batch.src, batch.tgt_in, features_only=True)
                    output = self.model.output_layer
                    loss, nll, _ = output_label_smoothed_nll(features, output.weight, output.bias, batch.tgt_out,
                                                             self.cfg.train.label_smoothing)
                scaled = loss * world / n_tokens
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach().float())
            nlls.append(nll.detach().float())
        local = torch.stack([torch.stack(losses).sum(), torch.stack(nlls).sum()]).tolist()
        loss_total, nll_total = self.dist.all_reduce_sum(local)  # NaN/inf anywhere -> non-finite everywhere
        if not math.isfinite(loss_total):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_updates += 1
            self.state.nonfinite_in_a_row += 1
            if self.state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise self._collective_error(
                    f"training diverged: non-finite loss in {MAX_NONFINITE_IN_A_ROW} updates in a row at step "
                    f"{self.state.step} (lower train.optimizer.lr or check the data)"
                )
            return math.nan, math.nan, n_tokens, n_src
        self.state.nonfinite_in_a_row = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_norm > 0:
            clip_gradients(self.optimizer, self.cfg.train.clip_norm, in_step=self.scaler is None)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_total / n_tokens, nll_total / n_tokens, n_tokens, n_src

    def _collective_error(self, message: str) -> NmtError:
        """The error for a failure every rank detects at once (only rank 0 will print it)."""
        return CollectiveError(message) if self.dist.enabled else NmtError(message)

    # -- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Valid loss, perplexity and BLEU of greedy/beam decoding.

        Under DDP each rank scores and decodes its share of the validation set; the sums and the
        hypotheses are gathered so that every rank returns the same result.
        """
        self.model.eval()
        cfg = self.cfg.train
        rank, world = self.dist.rank, self.dist.world_size
        nll_total, tokens = 0.0, 0
        lengths = self.valid_data.src_lengths, self.valid_data.tgt_lengths
        for idx in token_batches(*lengths, cfg.batch_tokens, seed=0, epoch=0, shuffle=False, rank=rank,
                                 world_size=world):
            batch = collate(self.valid_data, idx).to(self.device)
            with autocast(self.precision, self.device):
                logits = self.model(batch.src, batch.tgt_in)
            _, nll, n = label_smoothed_nll(logits, batch.tgt_out, 0.0)
            nll_total += nll.item()
            tokens += n
        nll_total, tokens = self.dist.all_reduce_sum([nll_total, tokens])
        mine = range(rank, len(self.valid_data), world)
        sources = [self.valid_data.source_ids(i) for i in mine]
        hyps = decode_ids(self.model, sources, beam=cfg.valid_beam, batch_size=cfg.valid_batch_size,
                          device=self.device, precision=self.precision) if sources else []
        texts: list[str] = [""] * len(self.valid_data)
        for r, part in enumerate(self.dist.all_gather([self.tgt_tok.decode(h[0].tokens) for h in hyps])):
            texts[r::world] = part
        loss = nll_total / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 100.0)), "bleu": bleu(texts, self.valid_refs)}

    def _after_validation(self, result: dict[str, float]) -> bool:
        """Record a validation; save best/periodic checkpoints. Returns True to stop early."""
        cfg = self.cfg.train
        metric = cfg.early_stopping.metric
        higher = HIGHER_IS_BETTER[metric]
        value = result[metric]
        improved = self.state.best is None or (value > self.state.best if higher else value < self.state.best)
        if improved:
            self.state.best = value
            self.state.bad_validations = 0
        else:
            self.state.bad_validations += 1
        self.scheduler.on_validation(value, higher)
        self.state.history.append({"step": self.state.step, **result})
        self._log({"type": "valid", "step": self.state.step, "epoch": self.state.epoch, **result,
                   "best": self.state.best, "elapsed": round(self.state.elapsed, 1)})
        if improved:
            self._save("best.pt")
        if cfg.keep_last > 0:
            self._save(f"ckpt_step{self.state.step:08d}.pt")
            if self.dist.is_main:
                periodic = sorted(self.run_dir.glob("ckpt_step*.pt"))
                for old in periodic[: -cfg.keep_last]:
                    old.unlink(missing_ok=True)
        self._say(
            f"step {self.state.step}: valid loss {result['loss']:.3f} ppl {result['ppl']:.2f} "
            f"bleu {result['bleu']:.2f}{' (best)' if improved else ''}"
        )
        patience = cfg.early_stopping.patience
        return patience > 0 and self.state.bad_validations >= patience

    def _say(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    # -- the loop ------------------------------------------------------------------------------

    def _limits_reached(self) -> str | None:
        cfg = self.cfg.train
        if cfg.max_steps and self.state.step >= cfg.max_steps:
            return f"reached train.max_steps={cfg.max_steps}"
        if cfg.max_epochs and self.state.epoch >= cfg.max_epochs:
            return f"reached train.max_epochs={cfg.max_epochs}"
        if cfg.max_minutes and self.state.elapsed >= cfg.max_minutes * 60:
            return f"reached train.max_minutes={cfg.max_minutes}"
        return None

    def summary(self, counts: dict[str, int]) -> str:
        """The start-up line: parameters per component (`counts`), device, precision, effective batch."""
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
        cfg = self.cfg.train
        world = self.dist.world_size
        processes = f"{world} processes ({self.dist.backend})" if self.dist.enabled else "1 process"
        return (
            f"model: {counts['total']:,} parameters ({parts}); device {self.device}, precision {self.precision}; "
            f"{processes}; effective batch {cfg.batch_tokens} tokens x {world} rank{'s' * (world > 1)} "
            f"x update_freq {cfg.update_freq} = {cfg.batch_tokens * world * cfg.update_freq:,} tokens; "
            f"{len(self.train_sets[0]):,} training pairs"
            + (f" in {len(self.train_sets)} segmentations, one per epoch" if len(self.train_sets) > 1 else "")
        )

    def train(self) -> dict[str, Any]:
        """Run until a limit or early stopping; returns a summary of the run."""
        cfg = self.cfg.train
        counts = self.model.parameter_summary()
        self._say(self.summary(counts))
        self._log({"type": "start", "step": self.state.step, "parameters": counts["total"],
                   "device": str(self.device), "precision": self.precision, "world_size": self.dist.world_size,
                   "effective_batch_tokens": cfg.batch_tokens * self.dist.world_size * cfg.update_freq})
        stop_reason = self._limits_reached()
        bar = tqdm(total=cfg.max_steps or None, initial=self.state.step, disable=self.quiet, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        window = {"loss": 0.0, "nll": 0.0, "tgt": 0, "src": 0, "updates": 0, "seconds": 0.0}
        validated_at = self.state.step
        rank, world = self.dist.rank, self.dist.world_size
        with _StopRequest() as stop:
            while stop_reason is None:
                data = self.train_sets[self.state.epoch % len(self.train_sets)]
                batches = token_batches(data.src_lengths, data.tgt_lengths, cfg.batch_tokens, seed=cfg.seed,
                                        epoch=self.state.epoch, rank=rank, world_size=world, even=True)
                if not batches:
                    raise self._collective_error(
                        f"{self.data_dir}: the training data makes fewer batches of train.batch_tokens="
                        f"{cfg.batch_tokens} than there are processes ({world}); lower train.batch_tokens"
                    )
                while self.state.batch_in_epoch < len(batches) and stop_reason is None:
                    t0 = time.perf_counter()
                    chunk = batches[self.state.batch_in_epoch: self.state.batch_in_epoch + cfg.update_freq]
                    loss, nll, n_tgt, n_src = self._update([collate(data, idx) for idx in chunk])
                    self.state.batch_in_epoch += len(chunk)
                    self.state.step += 1
                    seconds = time.perf_counter() - t0
                    self.state.elapsed += seconds
                    window["seconds"] += seconds  # throughput counts update time only, not validation
                    if math.isfinite(loss):
                        window["loss"] += loss * n_tgt
                        window["nll"] += nll * n_tgt
                    window["tgt"] += n_tgt
                    window["src"] += n_src
                    window["updates"] += 1
                    bar.update(1)
                    if self.state.step % cfg.log_every == 0:
                        self._log_window(window, bar)
                    if self.state.step % cfg.valid_every == 0:
                        t0 = time.perf_counter()
                        if self._after_validation(self.validate()):
                            stop_reason = f"early stopping: no {cfg.early_stopping.metric} improvement in " \
                                          f"{cfg.early_stopping.patience} validations"
                        self.state.elapsed += time.perf_counter() - t0
                        validated_at = self.state.step
                        self._save("last.pt")
                    # one all-reduce makes every rank take the same decisions: stop if any rank got a
                    # signal; rank 0's clock is the run's clock (train.max_minutes)
                    signalled, elapsed = self.dist.all_reduce_sum(
                        [float(stop.signal is not None), self.state.elapsed if self.dist.is_main else 0.0])
                    self.state.elapsed = elapsed
                    if signalled:
                        self._save("last.pt")
                        bar.close()
                        name = signal.Signals(stop.signal).name if stop.signal else "a signal to another rank"
                        raise self._collective_error(
                            f"interrupted by {name} at step {self.state.step}; checkpoint saved to "
                            f"{self.run_dir / 'last.pt'}; continue with: nmt train {self.cfg.path or 'CONFIG'} --resume"
                        )
                    stop_reason = stop_reason or self._limits_reached()
                if self.state.batch_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    stop_reason = stop_reason or self._limits_reached()
        bar.close()
        if validated_at != self.state.step:
            t0 = time.perf_counter()
            self._after_validation(self.validate())
            self.state.elapsed += time.perf_counter() - t0
        self._save("last.pt")
        self._log({"type": "end", "step": self.state.step, "epoch": self.state.epoch, "stop_reason": stop_reason,
                   "best": self.state.best, "elapsed": round(self.state.elapsed, 1)})
        self._say(f"stopped: {stop_reason}; best {cfg.early_stopping.metric} {self.state.best}")
        summary = {"steps": self.state.step, "epochs": self.state.epoch, "best": self.state.best,
                   "stop_reason": stop_reason, "elapsed": self.state.elapsed}
        if self.dist.enabled:
            summary.update(rank=self.dist.rank, world_size=self.dist.world_size)
        return summary

    def _log_window(self, window: dict[str, Any], bar: tqdm) -> None:
        seconds = max(window["seconds"], 1e-9)
        loss = window["loss"] / max(window["tgt"], 1)
        record = {
            "type": "train", "step": self.state.step, "epoch": self.state.epoch,
            "loss": round(loss, 5), "nll": round(window["nll"] / max(window["tgt"], 1), 5),
            "lr": self.scheduler.lr, "tgt_tokens_per_s": round(window["tgt"] / seconds, 1),
            "src_tokens_per_s": round(window["src"] / seconds, 1), "elapsed": round(self.state.elapsed, 1),
            "skipped_updates": self.state.skipped_updates,
        }
        self._log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.lr:.2e}", tok_s=f"{record['tgt_tokens_per_s']:.0f}")
        window.update(loss=0.0, nll=0.0, tgt=0, src=0, updates=0, seconds=0.0)


def train(cfg: Config, device: str = "auto", resume: bool = False, force: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Train the model described by `cfg` (the `nmt train` command); under torchrun, one process of a
    DistributedDataParallel run (see nmt/training/distributed.py)."""
    dist, resolved = setup(device)
    try:
        summary = Trainer(cfg, device=resolved, resume=resume, force=force, quiet=quiet, dist=dist).train()
        # every rank is done before the process group goes away: a rank that tore gloo down while another
        # still talked to it aborted ("terminate called without an active exception") under load
        dist.barrier()
        return summary
    except CollectiveError:
        if dist.is_main:
            raise
        sys.exit(NmtError.exit_code)  # rank 0 reports it; N copies of one message would only be noise
    # The process group is not destroyed: doing so while another rank closed its end aborted processes
    # now and then; the CLI ends a torchrun process right after (nmt.cli._exit).
