"""Train a CycleGAN between two manifest domains and write its run directory (``covidcxr synth train``).

The run directory::

    run.json                         sealed SynthRecord: networks, domains, preprocessing, generator SHA-256s
    generator_a2b.safetensors        A -> B (and generator_b2a.safetensors: B -> A)
    config.yaml                      the resolved configuration (a resume must use the same one)
    domains.csv                      the real rows each domain trained on (image, patient, label, source, split)
    losses.csv, losses.png           losses every ``log_every`` steps (window means), images/s, learning rate
    samples/step_NNNNNN.png          contact sheets every ``sample_every`` steps (rows: A, A->B, A->B->A, B, ...)
    checkpoints/last.pt              networks, optimisers, schedules, image buffers, step: ``--resume``

Every step's randomness (which images, their crops, the buffer's choices) comes from a generator seeded
by ``(seed, step)``, and the checkpoint (written atomically) holds everything else, so a run killed at
any point and resumed with ``--resume`` continues from its last checkpoint exactly as if uninterrupted
(bit-identical on CPU). ``run.json`` is written last: a directory without it is an unfinished run.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidcxr.data.preprocess import to_tensor
from covidcxr.errors import CovidCXRError
from covidcxr.files import atomic_write_bytes, write_csv
from covidcxr.models.cyclegan import (PatchDiscriminator, ResnetGenerator, SynthRecord, gan_spec, init_weights,
                                      receptive_field, save_synth_run)
from covidcxr.models.record import RUN_JSON
from covidcxr.progress import make_progress
from covidcxr.training.state import CHECKPOINT_DIR, LAST_CKPT, load_checkpoint, resolve_device, save_checkpoint
from covidcxr.training.synth.config import SynthConfig, dump_synth_config
from covidcxr.training.synth.data import Domain, jittered, load_domain, rows_sha256, select_domain_rows, split_manifest
from covidcxr.training.synth.objectives import ImagePool, discriminator_loss, linear_decay, lsgan
from covidcxr.training.synth.sheet import contact_sheet, plot_losses

LOSSES = ("g_total", "g_gan_a2b", "g_gan_b2a", "cycle_a", "cycle_b", "identity_a", "identity_b", "d_a", "d_b")


class CycleGAN(torch.nn.Module):
    """The four networks: ``g_ab`` (A -> B), ``g_ba``, ``d_a`` (judges A images), ``d_b``."""

    def __init__(self, cfg: SynthConfig):
        super().__init__()
        self.g_ab, self.g_ba = (ResnetGenerator(1, cfg.ngf, cfg.blocks) for _ in range(2))
        self.d_a, self.d_b = (PatchDiscriminator(1, cfg.ndf, cfg.n_layers) for _ in range(2))
        init_weights(self)


def _batch(domain: Domain, idx: np.ndarray, rng, cfg: SynthConfig, spec, device) -> torch.Tensor:
    return torch.stack([to_tensor(jittered(domain.images[i], rng, cfg.jitter, cfg.hflip), spec) for i in idx]).to(device)


def train_step(nets: CycleGAN, opt_g, opt_d, pools, a: torch.Tensor, b: torch.Tensor, rng, cfg: SynthConfig) -> dict:
    """One CycleGAN step: generators first (discriminators frozen), then both discriminators on buffered fakes."""
    fake_b, fake_a = nets.g_ab(a), nets.g_ba(b)
    rec_a, rec_b = nets.g_ba(fake_b), nets.g_ab(fake_a)
    for d in (nets.d_a, nets.d_b):
        d.requires_grad_(False)
    terms = {"g_gan_a2b": lsgan(nets.d_b(fake_b), True), "g_gan_b2a": lsgan(nets.d_a(fake_a), True),
             "cycle_a": (rec_a - a).abs().mean(), "cycle_b": (rec_b - b).abs().mean()}
    lam_idt = cfg.lambda_identity * cfg.lambda_cycle
    if lam_idt > 0:
        terms["identity_a"] = (nets.g_ba(a) - a).abs().mean()  # an A image needs no change by B -> A
        terms["identity_b"] = (nets.g_ab(b) - b).abs().mean()
    g_total = terms["g_gan_a2b"] + terms["g_gan_b2a"] + cfg.lambda_cycle * (terms["cycle_a"] + terms["cycle_b"])
    if lam_idt > 0:
        g_total = g_total + lam_idt * (terms["identity_a"] + terms["identity_b"])
    if not torch.isfinite(g_total):
        raise CovidCXRError("the generator loss became NaN or infinite; lower lr or check the images")
    opt_g.zero_grad(set_to_none=True)
    g_total.backward()
    opt_g.step()
    for d in (nets.d_a, nets.d_b):
        d.requires_grad_(True)
    d_a = discriminator_loss(nets.d_a, a, pools["a"].query(fake_a, rng))
    d_b = discriminator_loss(nets.d_b, b, pools["b"].query(fake_b, rng))
    opt_d.zero_grad(set_to_none=True)
    (d_a + d_b).backward()
    opt_d.step()
    return {"g_total": g_total, **terms, "d_a": d_a, "d_b": d_b}


@torch.no_grad()
def sheet_rows(nets: CycleGAN, samples: dict[str, torch.Tensor], names: tuple[str, str]):
    """(label, images in [0, 1]) rows of a contact sheet: each domain, its translation and its round trip."""
    nets.eval()
    a, b = samples["a"], samples["b"]
    to01 = lambda t: ((t[:, 0].clamp(-1, 1) + 1) / 2).cpu().numpy()  # noqa: E731
    fb, fa = nets.g_ab(a), nets.g_ba(b)
    rows = [(names[0], to01(a)), (f"{names[0]}>{names[1]}", to01(fb)), (f"{names[0]}>{names[1]}>{names[0]}", to01(nets.g_ba(fb))),
            (names[1], to01(b)), (f"{names[1]}>{names[0]}", to01(fa)), (f"{names[1]}>{names[0]}>{names[1]}", to01(nets.g_ab(fa)))]
    nets.train()
    return rows


def _check_out(out: Path, cfg: SynthConfig, resume: bool) -> None:
    if (out / RUN_JSON).exists():
        raise CovidCXRError(f"{out}: already holds a finished CycleGAN run ({RUN_JSON}); choose a new --out")
    if (out / CHECKPOINT_DIR / LAST_CKPT).exists() and not resume:
        raise CovidCXRError(f"{out}: holds an unfinished CycleGAN run; pass --resume to continue it or choose another --out")
    text = dump_synth_config(cfg)
    if resume and (out / "config.yaml").is_file() and (out / "config.yaml").read_text() != text:
        raise CovidCXRError(f"{out / 'config.yaml'}: the run was started with another configuration; resume with the "
                            "same config and overrides")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", text.encode())


def train_synth(cfg: SynthConfig, out: str | Path, *, resume: bool = False, device: str = "auto") -> SynthRecord:
    """Train (or with ``resume`` continue) the CycleGAN of ``cfg`` into ``out``; returns the sealed record."""
    threads, out = torch.get_num_threads(), Path(out)
    existed = out.exists()
    try:
        return _train(cfg, out, resume, device)
    except Exception:
        # No half run directory: what this call created before its first checkpoint goes again.
        if not existed and not (out / CHECKPOINT_DIR / LAST_CKPT).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)


def _train(cfg: SynthConfig, out: Path, resume: bool, device_name: str) -> SynthRecord:
    started = time.perf_counter()
    _check_out(out, cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(device_name)
    spec = gan_spec(cfg.image_size, cfg.working_size, cfg.intensity)
    manifest = split_manifest(cfg)
    names = (cfg.domain_a.name, cfg.domain_b.name)
    rows = {"a": select_domain_rows(manifest, cfg, cfg.domain_a), "b": select_domain_rows(manifest, cfg, cfg.domain_b)}
    shared = set(rows["a"]["image"]) & set(rows["b"]["image"])
    if shared:
        raise CovidCXRError(f"{len(shared)} image(s) match both domains (e.g. {sorted(shared)[0]}); make the filters disjoint")
    progress = make_progress("img", disable=not cfg.progress, extra="G {task.fields[g]:.3f} D {task.fields[d]:.3f}")
    with progress:
        task = progress.add_task("reading images", total=len(rows["a"]) + len(rows["b"]), g=float("nan"), d=float("nan"))
        domains = {k: load_domain(names[i], rows[k], spec, lambda: progress.advance(task)) for i, k in enumerate("ab")}
        torch.manual_seed(cfg.seed)
        nets = CycleGAN(cfg).to(device)
        opt_g = torch.optim.Adam(itertools.chain(nets.g_ab.parameters(), nets.g_ba.parameters()), cfg.lr, betas=(cfg.beta1, 0.999))
        opt_d = torch.optim.Adam(itertools.chain(nets.d_a.parameters(), nets.d_b.parameters()), cfg.lr, betas=(cfg.beta1, 0.999))
        factor = lambda s: linear_decay(s, cfg.steps, cfg.decay)  # noqa: E731
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_g, opt_d)]
        pools = {"a": ImagePool(cfg.pool_size), "b": ImagePool(cfg.pool_size)}
        step, history, window, elapsed, resumed_at = 0, [], {}, 0.0, []
        last = out / CHECKPOINT_DIR / LAST_CKPT
        if resume and last.exists():
            ckpt = load_checkpoint(last)
            nets.load_state_dict(ckpt["nets"])
            opt_g.load_state_dict(ckpt["opt_g"])
            opt_d.load_state_dict(ckpt["opt_d"])
            for s, state in zip(scheds, ckpt["scheds"]):
                s.load_state_dict(state)
            for k in pools:
                pools[k].load_state_dict(ckpt["pools"][k])
            step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
            history, window = list(ckpt["history"]), dict(ckpt["window"])
            resumed_at = list(ckpt["resumed_at"]) + [step]
        sample_rng = np.random.default_rng([cfg.seed, 7])
        samples = {k: torch.stack([to_tensor(domains[k].images[i], spec) for i in
                                   np.sort(sample_rng.choice(len(domains[k]), min(cfg.sample_images, len(domains[k])),
                                                             replace=False))]).to(device) for k in "ab"}
        per_step = 2 * cfg.batch_size  # one batch of each domain
        task = progress.add_task("training", total=cfg.steps * per_step, completed=step * per_step, g=float("nan"),
                                 d=float("nan"))
        stopped, t_run = "steps", time.perf_counter()
        nets.train()

        def checkpoint():
            save_checkpoint(last, {"step": step, "nets": nets.state_dict(), "opt_g": opt_g.state_dict(),
                                   "opt_d": opt_d.state_dict(), "scheds": [s.state_dict() for s in scheds],
                                   "pools": {k: p.state_dict() for k, p in pools.items()}, "history": history,
                                   "window": window, "elapsed": elapsed + time.perf_counter() - t_run,
                                   "resumed_at": resumed_at})
            _write_losses(out, history, names)

        while step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, step])
            ia, ib = (rng.integers(0, len(domains[k]), size=cfg.batch_size) for k in "ab")
            a, b = _batch(domains["a"], ia, rng, cfg, spec, device), _batch(domains["b"], ib, rng, cfg, spec, device)
            t0 = time.perf_counter()
            losses = {k: v.detach() for k, v in train_step(nets, opt_g, opt_d, pools, a, b, rng, cfg).items()}
            lr = opt_g.param_groups[0]["lr"]  # the rate this step used
            for s in scheds:
                s.step()
            step += 1
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v)
            window["n"] = window.get("n", 0) + 1
            window["seconds"] = window.get("seconds", 0.0) + time.perf_counter() - t0
            progress.update(task, advance=per_step, g=float(losses["g_total"]), d=float(losses["d_a"] + losses["d_b"]))
            over_time = cfg.max_seconds is not None and elapsed + time.perf_counter() - t_run >= cfg.max_seconds
            if step % cfg.log_every == 0 or step == cfg.steps or over_time:  # a stop flushes the partial window
                n = window.pop("n")
                seconds = window.pop("seconds")
                history.append({"step": step, "lr": lr, **{k: v / n for k, v in window.items()},
                                "images_per_s": n * per_step / seconds if seconds > 0 else float("nan")})
                window = {}
                _write_losses(out, history, names, plot=False)  # watchable while it runs; the plot at checkpoints
            if step % cfg.sample_every == 0 or step == cfg.steps:
                contact_sheet(sheet_rows(nets, samples, names), out / "samples" / f"step_{step:06d}.png")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or over_time:
                checkpoint()
            if over_time and step < cfg.steps:
                stopped = "max_seconds"
                contact_sheet(sheet_rows(nets, samples, names), out / "samples" / f"step_{step:06d}.png")
                break
        train_seconds = elapsed + time.perf_counter() - t_run
    return _finish(cfg, out, nets, spec, manifest, domains, history, step, stopped, train_seconds, resumed_at,
                   time.perf_counter() - started, device)


def _write_losses(out: Path, history: list[dict], names: tuple[str, str], plot: bool = True) -> None:
    frame = pd.DataFrame(history, columns=["step", "lr", *LOSSES, "images_per_s"])
    write_csv(out / "losses.csv", frame, float_format="%.6g", fsync=False)
    if plot and len(frame):
        plot_losses(frame, out / "losses.png", names)


def _finish(cfg, out, nets, spec, manifest, domains, history, step, stopped, train_seconds, resumed_at, wall, device):
    _write_losses(out, history, (cfg.domain_a.name, cfg.domain_b.name))
    table = pd.concat([d.rows.assign(domain=k) for k, d in domains.items()], ignore_index=True)
    write_csv(out / "domains.csv", table)
    data = {"manifest": str(cfg.manifest), "manifest_sha256": manifest.sha256(),
            "domains": {k: {"images": len(d), "patients": int(d.rows["patient_id"].nunique()),
                            "rows_sha256": rows_sha256(d.rows), "splits": sorted(set(d.rows["split"])),
                            "labels": {str(x): int(n) for x, n in d.rows["label"].value_counts().items()}}
                        for k, d in domains.items()}}
    done = max(1, step - (resumed_at[0] if resumed_at else 0))
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "train_seconds": round(train_seconds, 1), "wall_s": round(wall, 1), "resumed_at": resumed_at,
            "images_per_s": round(step * 2 * cfg.batch_size / train_seconds, 3) if train_seconds > 0 else None,
            "steps_this_call": done, "patch_receptive_field_px": receptive_field(cfg.n_layers)}
    nets.cpu().eval()
    return save_synth_run(
        out, {"a2b": nets.g_ab, "b2a": nets.g_ba}, ngf=cfg.ngf, n_blocks=cfg.blocks, ndf=cfg.ndf, n_layers=cfg.n_layers,
        preprocess=spec, domains={"a": cfg.domain_a.model_dump(mode="json"), "b": cfg.domain_b.model_dump(mode="json")},
        config=cfg.model_dump(mode="json"), data=data, info=info,
        history={"steps_done": step, "steps_planned": cfg.steps, "stopped": stopped,
                 "last": history[-1] if history else {}})


def train_synth_command(config: str | Path | None, out: str | Path, overrides: list[str], resume: bool) -> str:
    """``covidcxr synth train``: train and return a one-line summary."""
    from covidcxr.training.synth.config import load_synth_config

    record = train_synth(load_synth_config(config, overrides), out, resume=resume)
    last = record.history.get("last", {})
    a, b = record.domains["a"]["name"], record.domains["b"]["name"]
    return (f"CycleGAN {a} <-> {b}: {record.history['steps_done']} steps ({record.history['stopped']}), "
            f"{record.info['images_per_s']} img/s; last losses G {last.get('g_total', float('nan')):.3f}, "
            f"cycle {a} {last.get('cycle_a', float('nan')):.3f}, D {b} {last.get('d_b', float('nan')):.3f}. "
            f"Run written to {out}")
