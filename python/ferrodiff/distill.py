"""Few-step generation: progressive distillation and consistency models.

- :func:`progressive` distils a trained diffusion model into a student that takes half as many
  DDIM steps per round (Salimans & Ho 2022), from ``from_steps`` down to ``to_steps``.
- :func:`consistency_distillation` (CD) and :func:`consistency_training` (CT / iCT) train a
  consistency model (Song et al. 2023; Song & Dhariwal 2023), sampled in one or a few steps by
  :class:`ferrodiff.ConsistencySampler`.

All three run on :class:`ferrodiff.Trainer` (``objective=``), so they have its progress bar,
checkpoints with exact resume, EMA, learning-rate schedules and label dropout for guidance.

    >>> import ferrodiff as fd
    >>> result = fd.distill.progressive("ferrodiff-demo/run", schedule, digits.data, digits.labels,
    ...                                 from_steps=64, to_steps=4, out="distilled")  # doctest: +SKIP
    >>> x = result.sampler().sample(result.model, (100, 1, 8, 8), labels=labels)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferrodiff._core import (
    ConsistencySampler,
    Euler,
    Schedule,
    Trainer,
    consistency_function,
    consistency_training_schedule,
    student_sigmas,
)

__all__ = [
    "ConsistencySampler",
    "ProgressiveResult",
    "consistency_distillation",
    "consistency_function",
    "consistency_training",
    "consistency_training_schedule",
    "progressive",
    "student_sampler",
    "student_sigmas",
]

_STATE_FILE = "distill.json"


def student_sampler(
    schedule: Schedule, steps: int, sigma_max: float | None = 80.0, prediction: str = "v", **kwargs
) -> Euler:
    """The sampler of an N-step progressively distilled student that predicts ``prediction``:
    Euler in σ space (DDIM, η = 0) on the levels :func:`student_sigmas` gives, the model called
    at exactly its distillation timesteps."""
    sigmas = student_sigmas(schedule, steps, sigma_max)
    return Euler(schedule, sigmas=sigmas, timestep_mode="interpolate", prediction=prediction, **kwargs)


@dataclass
class ProgressiveResult:
    """What :func:`progressive` returns: the final student (EMA weights), its step count, the
    schedule, and per round the student steps, the mean loss of its last 10 % of steps and the
    folder its checkpoint was saved to (None without ``out``)."""

    model: object
    steps: int
    schedule: Schedule
    sigma_max: float | None = 80.0
    prediction: str = "v"
    rounds: list = field(default_factory=list)

    def sampler(self, **kwargs) -> Euler:
        """The student's sampler (see :func:`student_sampler`)."""
        return student_sampler(self.schedule, self.steps, self.sigma_max, self.prediction, **kwargs)


def _copy_model(model):
    """An independent copy of a ferrodiff model (training one never changes the other)."""
    import pickle

    return pickle.loads(pickle.dumps(model))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _teacher_info(teacher, teacher_prediction):
    """(teacher object for the Trainer, its prediction, its model for the student's init)."""
    import ferrodiff as fd

    if isinstance(teacher, Trainer):
        pred = teacher_prediction or teacher.config["prediction"]
        return teacher, pred, teacher.ema_model()
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        model = fd.nn.Model.load(path)
        pred = teacher_prediction
        info = path / "config.json"
        if pred is None and info.exists():
            pred = json.loads(info.read_text()).get("train", {}).get("prediction")
        if pred is None:
            raise ValueError(f"{path}: cannot tell what the teacher predicts: pass teacher_prediction=")
        # The Trainer loads the path itself, checking the checkpoint's schedule against the given one.
        return os.fspath(path), pred, model
    if isinstance(teacher, fd.nn.Model):
        if teacher_prediction is None:
            raise ValueError("pass teacher_prediction= ('epsilon', 'x0' or 'v') with a Model teacher")
        return teacher, teacher_prediction, teacher
    if callable(teacher):
        if teacher_prediction is None:
            raise ValueError("pass teacher_prediction= ('epsilon', 'x0' or 'v') with a callable teacher")
        return teacher, teacher_prediction, None
    raise TypeError(
        "teacher must be a ferrodiff Trainer or Model, a run folder, or a callable teacher(x, t[, y]), "
        f"got {type(teacher).__name__}"
    )


def progressive(
    teacher,
    schedule: Schedule,
    data,
    labels=None,
    *,
    from_steps: int = 64,
    to_steps: int = 4,
    steps_per_round: int = 400,
    prediction: str = "v",
    teacher_prediction: str | None = None,
    guidance: float | None = None,
    guidance_range: tuple[float, float] | None = None,
    sigma_max: float | None = 80.0,
    student=None,
    batch_size: int = 64,
    lr: float = 2e-4,
    lr_schedule: str = "constant",
    ema_decay: float = 0.995,
    class_dropout: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    callback=None,
    callback_every: int = 100,
) -> ProgressiveResult:
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2) from ``from_steps`` DDIM steps
    down to ``to_steps``, halving per round.

    Each round trains a student of N = current/2 steps for ``steps_per_round`` steps on the
    target of two DDIM steps of its teacher (t → t − 0.5/N → t − 1/N), weighted by max(SNR, 1);
    the student starts from the teacher's weights and predicts ``prediction``: "v" (the
    default) or "x0", the parameterisations Salimans & Ho recommend because they stay stable
    where an ε-prediction's x̂ multiplies its error by σ; "epsilon" is allowed. An ε-teacher's
    weights are a good start for a v-student (v and ε nearly coincide at high noise). The
    student's EMA weights become the next round's teacher.

    ``teacher`` is a :class:`~ferrodiff.Trainer` (its EMA weights and prediction), a run folder,
    a :class:`~ferrodiff.nn.Model` or a callable ``teacher(x, t[, y])`` on real-valued
    timesteps (then pass ``student=`` and ``teacher_prediction=``). ``guidance`` distils the
    teacher's classifier-free guidance at that scale into the student (a class-conditional
    teacher trained with label dropout); ``guidance_range=(lo, hi)`` instead makes w an input
    of the student (Meng et al. 2023): each row draws w in [lo, hi], the teacher is guided by it,
    and the student, built from the teacher's weights with ``guidance_embed=True`` (its w
    embedding zero-initialised), learns the guided teacher for every w; sample it with
    ``guidance_scale=w`` (one pass per step). The grid's top level is where σ reaches ``sigma_max``
    (80, as the σ samplers cap it; None: the schedule's last timestep, whose σ is about 2·10⁴ on
    the cosine schedule, where an ε-prediction teacher's first step is unusable). With ``out`` every round is checkpointed into
    ``out/`` (``out/steps-N/`` holds each finished student) and a stopped run resumes exactly
    when called again with the same arguments.
    """
    n_total = len(schedule)
    if not (isinstance(from_steps, int) and isinstance(to_steps, int)):
        raise TypeError("from_steps and to_steps must be integers")
    if to_steps < 1 or from_steps < 2 or from_steps > n_total // 1:
        raise ValueError(
            f"need 1 <= to_steps < from_steps <= T = {n_total}, got from_steps={from_steps}, to_steps={to_steps}"
        )
    if from_steps % to_steps or not _is_power_of_two(from_steps // to_steps) or from_steps == to_steps:
        raise ValueError(
            f"to_steps must be from_steps divided by a power of two (each round halves the steps), "
            f"got from_steps={from_steps}, to_steps={to_steps}"
        )
    if steps_per_round < 1:
        raise ValueError(f"steps_per_round must be at least 1, got {steps_per_round}")
    teacher_obj, teacher_pred, teacher_model = _teacher_info(teacher, teacher_prediction)
    if prediction not in ("v", "x0", "epsilon"):
        raise ValueError(f"prediction must be 'v', 'x0' or 'epsilon', got {prediction!r}")
    if guidance is not None and guidance_range is not None:
        raise ValueError("pass guidance (one scale) or guidance_range (a range of scales), not both")
    if student is None:
        if teacher_model is None:
            raise ValueError("a callable teacher needs student= (the model to distil into)")
        student = teacher_model
        if guidance_range is not None and not student.config.get("guidance_embed", False):
            import ferrodiff as fd

            config = dict(student.config)
            if config.get("type") != "unet":
                raise ValueError("guidance_range needs a U-Net (guidance_embed); the teacher is not one")
            config["guidance_embed"] = True
            embedded = fd.nn.Model(config, seed)
            missing, unexpected = embedded.load_state_dict(student.state_dict(), strict=False)
            assert not unexpected and all(m.startswith("guidance_embedding.") for m in missing), missing
            student = embedded
    out = Path(out) if out is not None else None
    state = {"rounds": []}
    if out is not None and (out / _STATE_FILE).exists():
        state = json.loads((out / _STATE_FILE).read_text())
        if (state.get("from_steps"), state.get("to_steps")) != (from_steps, to_steps):
            raise ValueError(
                f"{out} holds a distillation from {state.get('from_steps')} to {state.get('to_steps')} steps, "
                f"not {from_steps} to {to_steps}: use another out folder"
            )

    def save_state():
        if out is None:
            return
        from ferrodiff.cli import _save_json

        _save_json(out / _STATE_FILE, {"from_steps": from_steps, "to_steps": to_steps, **state})

    rounds = state["rounds"]
    steps = from_steps
    done_steps = {r["steps"] for r in rounds}
    current_teacher, current_pred = teacher_obj, teacher_pred
    import ferrodiff as fd

    # Finished rounds: continue from the last finished student.
    while steps // 2 in done_steps:
        steps //= 2
        current_teacher = fd.nn.Model.load(out / f"steps-{steps}")
        current_pred = prediction
        student = current_teacher
    while steps > to_steps:
        n = steps // 2
        options = {
            "student_steps": n,
            "teacher_prediction": current_pred,
            "guidance": guidance,
            "guidance_range": list(guidance_range) if guidance_range is not None else None,
            "sigma_max": sigma_max,
        }
        ck = out / "checkpoint" if out is not None else None
        trainer = None
        if ck is not None and (ck / "checkpoint.safetensors").exists():
            info = json.loads((ck / "config.json").read_text())
            if info["train"]["objective"].get("student_steps") == n:
                # A model teacher is in the checkpoint; an external one must be passed again.
                external = not isinstance(current_teacher, (Trainer, fd.nn.Model))
                trainer = Trainer.resume(ck, data, labels, teacher=current_teacher if external else None)
        if trainer is None:
            trainer = Trainer(
                _copy_model(student),
                schedule,
                data,
                labels,
                batch_size=batch_size,
                lr=lr,
                lr_schedule=lr_schedule,
                total_steps=steps_per_round,
                grad_clip=grad_clip,
                ema_decay=ema_decay,
                class_dropout=class_dropout,
                prediction=prediction,
                seed=seed + n,
                objective="progressive_distillation",
                objective_options=options,
                teacher=current_teacher,
            )
            trainer.extra = {"distill": {"from_steps": from_steps, "to_steps": to_steps, "student_steps": n}}
        remaining = steps_per_round - trainer.step
        if remaining > 0:
            trainer.train(
                remaining,
                progress=progress,
                callback=callback,
                callback_every=callback_every,
                checkpoint=ck,
                checkpoint_every=checkpoint_every if ck is not None else 0,
            )
        model = trainer.ema_model()
        losses = np.asarray(trainer.losses)
        record = {
            "steps": n,
            "loss": float(losses[-max(len(losses) // 10, 1) :].mean()),
            "folder": None,
        }
        if out is not None:
            # The finished round as a run folder: `ferrodiff sample --checkpoint out/steps-N`
            # and `fd.nn.Model.load` read it (EMA weights, schedule, the student's step count).
            folder = out / f"steps-{n}"
            trainer.save(folder)
            record["folder"] = str(folder)
        rounds.append(record)
        save_state()
        current_teacher, current_pred, student = model, prediction, model
        steps = n
    return ProgressiveResult(
        model=student,
        steps=steps,
        schedule=schedule,
        sigma_max=sigma_max,
        prediction=prediction,
        rounds=rounds,
    )


def consistency_distillation(
    teacher,
    schedule: Schedule,
    data,
    labels=None,
    *,
    steps: int = 2000,
    student=None,
    teacher_prediction: str | None = None,
    **kwargs,
) -> Trainer:
    """Consistency distillation (Song et al. 2023, Algorithm 2): trains a consistency model from
    ``teacher``'s probability-flow ODE for ``steps`` steps and returns the trainer (sample it with
    ``ConsistencySampler(trainer)``). ``student`` defaults to a fresh copy of the teacher's
    architecture initialised from its weights. Options of the objective (``num_scales``,
    ``solver``, ``mu``, ``distance``, ``huber_c``, ``guidance``, ``params``) and of the Trainer
    (``batch_size``, ``lr``, ``checkpoint``...) are keyword arguments."""
    teacher_obj, pred, teacher_model = _teacher_info(teacher, teacher_prediction)
    objective_keys = {"num_scales", "solver", "mu", "distance", "huber_c", "guidance", "params"}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in objective_keys}
    options["teacher_prediction"] = pred
    train_keys = {"checkpoint", "checkpoint_every", "progress", "callback", "callback_every"}
    train_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in train_keys}
    if student is None:
        if teacher_model is None:
            raise ValueError("a callable teacher needs student= (the network of the consistency model)")
        student = _copy_model(teacher_model)
    kwargs.setdefault("total_steps", steps)
    trainer = Trainer(
        student,
        schedule,
        data,
        labels,
        objective="consistency_distillation",
        objective_options=options,
        teacher=teacher_obj,
        **kwargs,
    )
    trainer.train(steps, **train_kw)
    return trainer


def consistency_training(
    model, data, labels=None, *, steps: int = 2000, recipe: str = "ict", **kwargs
) -> Trainer:
    """Consistency training from data alone (``recipe="ict"``: Song & Dhariwal 2023; ``"ct"``:
    Song et al. 2023) for ``steps`` steps; returns the trainer (sample it with
    ``ConsistencySampler(trainer)``). Options of the objective (``s0``, ``s1``, ``mu0``,
    ``distance``, ``huber_c``, ``p_mean``, ``p_std``, ``params``) and of the Trainer are keyword
    arguments; N(k) reaches s1 at ``total_steps`` (default ``steps``)."""
    objective_keys = {"s0", "s1", "mu0", "distance", "huber_c", "p_mean", "p_std", "params"}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in objective_keys}
    options["recipe"] = recipe
    train_keys = {"checkpoint", "checkpoint_every", "progress", "callback", "callback_every"}
    train_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in train_keys}
    kwargs.setdefault("total_steps", steps)
    trainer = Trainer(
        model, None, data, labels, objective="consistency_training", objective_options=options, **kwargs
    )
    trainer.train(steps, **train_kw)
    return trainer
