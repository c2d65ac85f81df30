"""samopt inside Hugging Face's Trainer and Lightning: the same weights as the plain samopt loop on the same batches.

They run in fp32, bf16 and fp16 (with the frameworks' GradScaler). Both frameworks refuse fp16 on the
CPU, where torch has fp16 autocast and a GradScaler all the same, so on the CPU (CI) the tests switch on the
frameworks' own fp16 machinery by hand (:func:`hf_fp16`, :func:`lightning_precision`).
``SAMOPT_TEST_DEVICE=cuda pytest tests/test_integrations.py`` runs them on a GPU, as the frameworks do it there.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import samopt
from samopt.integrations.hf import SAMTrainer
from samopt.train.glue import model_path, read_split

GLUE = Path(__file__).resolve().parent / "data" / "glue"  # real GLUE dev files, see its README
DEVICE = torch.device(os.environ.get("SAMOPT_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
MIXED = ("bf16", "fp16")


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state(DEVICE) if CUDA else None


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if CUDA:
        torch.cuda.set_rng_state(state[1], DEVICE)


def autocast(precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=precision != "fp32")


def grad_scaler(precision):
    """The scaler both frameworks make for fp16: GradScaler's defaults (initial scale 2**16)."""
    return torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")


def hf_fp16(trainer, init_scale=None):
    """A Trainer made with ``fp16=True``, ready to ``train()``. On a GPU accelerate has set up fp16 autocast around
    the forward and a GradScaler; on the CPU, where accelerate leaves fp16 off, the same is switched on here. With
    ``init_scale`` the scaler is replaced by one starting at that scale."""
    assert trainer.accelerator.mixed_precision == "fp16"
    if not CUDA or init_scale is not None:
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler(DEVICE.type, init_scale=init_scale or 2.0**16)
    return trainer


class Pairs(torch.utils.data.Dataset):
    """The first ``n`` MRPC dev pairs, tokenised to a fixed length."""

    def __init__(self, n: int = 16, length: int = 32) -> None:
        split = read_split("mrpc", GLUE / "MRPC", "dev")
        tok = transformers.AutoTokenizer.from_pretrained(model_path("all-MiniLM-L6-v2"))
        a, b = zip(*split.texts[:n], strict=True)
        self.enc = tok(list(a), list(b), truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        self.labels = split.labels[:n]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def minilm(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    path = model_path("all-MiniLM-L6-v2")
    # fp32 master weights whatever the file's dtype (a copy saved in fp16 would otherwise load as fp16)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, dtype=torch.float32, **config
    )


class Recording(SAMTrainer):
    """Remembers every micro-batch and the RNG state before the first one."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not hasattr(self, "seen"):
            self.seen, self.rng = [], rng_state()
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def args(tmp_path, **changes):
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.5,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not CUDA,
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(**{**base, **changes})


def sam(model, **kw):
    return samopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, weight_decay=0.01, **kw)


def sam_sgd(model, **kw):
    return samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-2, **kw)


def sam_every_2(model, **kw):
    """SAM on updates 0, 2, ...: the Trainer's second update must run one pass per micro-batch."""
    return sam(model, schedule=samopt.schedules.EveryK(2), **kw)


def sam_sub_batch(model, **kw):
    """SAM whose ascent gradient comes from the first half of each micro-batch."""
    return sam(model, ascent=samopt.sub_batch.SubBatchAscent(2), **kw)


def sam_on_norms(model, **kw):
    """SAM on MiniLM's LayerNorms only (SAM-ON): from the second update the clean pass computes no other gradient."""
    return sam(model, mask=samopt.masks.sam_on(model), **kw)


def count_grads(param) -> list[int]:
    """One entry per gradient computed for ``param``."""
    calls = []
    param.register_hook(lambda g: calls.append(1))
    return calls


def count_forwards(model) -> list[int]:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# fp32: equal to 1e-6 after two AdamW steps. bf16/fp16: AdamW's first steps (about lr * sign(g)) turn rounding
# differences in near-zero gradients into lr-sized ones, so the mixed-precision runs use SGD, where the weights
# agree to 2e-6 of a 1.6e-3 move (rounding: accelerate's autocast wraps model.forward, the plain loop the loss).
# The gradient's norm is about 1: clipping at 0.5 acts on it; fp16 clips at 10 instead, which only a gradient
# left scaled by the GradScaler (x 2**16) would reach (clipping at 0.5 would hide one).
# model_accepts_loss_kwargs = False: the Trainer then averages the micro-batches' mean losses, as the plain
# loop does; MiniLM's head takes **kwargs but ignores num_items_in_batch, so by default the Trainer sums them
# (transformers#47688; test_trainer_with_rho_0_is_the_trainer pins that SAMTrainer follows the Trainer there).
@pytest.mark.parametrize(
    "precision, make, clip, atol",
    [("fp32", sam, 0.5, 1e-6), ("bf16", sam_sgd, 0.5, 1e-5), ("fp16", sam_sgd, 10, 1e-5),
     ("fp32", sam_every_2, 0.5, 1e-6), ("fp32", sam_sub_batch, 0.5, 1e-6), ("fp32", sam_on_norms, 0.5, 1e-6)],
)  # fmt: skip
def test_trainer_with_accumulation_and_clipping_equals_the_plain_samopt_loop(tmp_path, precision, make, clip, atol):
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    forwards, head_grads = count_forwards(model), count_grads(model.classifier.weight)
    settings = args(tmp_path, max_grad_norm=clip, bf16=precision == "bf16", fp16=precision == "fp16")
    trainer = Recording(model=model, args=settings, train_dataset=Pairs(), optimizers=(make(model), None))
    trainer.model_accepts_loss_kwargs = False
    if precision == "fp16":
        hf_fp16(trainer)
    trainer.train()
    assert len(trainer.seen) == 4  # 2 updates x 2 micro-batches
    assert len(forwards) == (6 if make is sam_every_2 else 8)  # 2 micro-batches x 2 passes, then x 1 or x 2
    # the head's gradient: in every pass, but not in the second update's clean passes under SAM-ON
    assert len(head_grads) == (6 if make is sam_on_norms else len(forwards))
    # the plain loop: the closure runs both micro-batches of a window, SAM clips the gradient at w + e
    opt = make(reference, max_grad_norm=clip)
    scaler = grad_scaler(precision)
    reference.train()
    set_rng_state(trainer.rng)  # the same dropout masks, drawn in the same order
    for window in (trainer.seen[:2], trainer.seen[2:]):

        def closure(p, window=window):  # p: the pass, whose take() cuts the clean pass of a sub-batch ascent
            total = 0.0
            for inputs in window:
                with autocast(precision):
                    loss = reference(**p.take(inputs)).loss / 2
                scaler.scale(loss).backward()
                total += loss.detach()
            return total

        opt.step(closure, scaler=scaler)
        scaler.update()
    if precision == "fp16":
        assert scaler.get_scale() == trainer.accelerator.scaler.get_scale() == 2.0**16  # no overflow, no skip
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=0), name
    initial = minilm().to(DEVICE).parameters()
    moved = max(float((a - b).abs().max().detach()) for a, b in zip(model.parameters(), initial, strict=True))
    assert moved > 100 * atol  # it trained, by far more than the tolerance


def test_trainer_with_rho_0_is_the_trainer(tmp_path):
    """With rho 0 and no dropout the pass at w + e recomputes the clean gradient, so SAMTrainer must be the
    Trainer itself: the same loss scaling over an accumulation window, whatever the Trainer decides it is (it
    sums MiniLM's micro-batch means: transformers#47688), and the same updates and logged losses."""

    def train(trainer_class, optimizer):
        model = minilm(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        settings = args(tmp_path, max_grad_norm=10, logging_steps=1)  # above the gradient's norm: no clipping
        trainer = trainer_class(model=model, args=settings, train_dataset=Pairs(), optimizers=(optimizer(model), None))
        trainer.train()
        return model, [r["loss"] for r in trainer.state.log_history if "loss" in r]

    ours, our_losses = train(SAMTrainer, lambda m: samopt.SAM(m.parameters(), torch.optim.SGD, rho=0.0, lr=1e-2))
    theirs, their_losses = train(transformers.Trainer, lambda m: torch.optim.SGD(m.parameters(), lr=1e-2))
    assert our_losses == pytest.approx(their_losses, rel=1e-6) and len(our_losses) == 2
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    initial = minilm().to(DEVICE).classifier.weight
    assert float((ours.classifier.weight - initial).abs().max()) > 1e-4  # it trained, by 100x the tolerance


def window_closure(model, window):
    """The plain loop's closure over an accumulation window of a Hugging Face model's inputs: the mean loss."""

    def closure():
        total = 0.0
        for inputs in window:
            loss = model(**inputs).loss / len(window)
            loss.backward()
            total += loss.detach()
        return total

    return closure


#: The published variants over AdamW as a GLUE user configures them: GSAM's rho follows the Trainer's linear decay,
#: the EMAs of Friendly-SAM and VaSSO see three updates, WSAM steps after AdamW's step.
HF_PUBLISHED = {
    "gsam": lambda ps, **kw: samopt.GSAM(ps, torch.optim.AdamW, 0.05, alpha=0.3, rho_min=0.01, lr=1e-4, **kw),
    "friendly-sam": lambda ps, **kw: samopt.FriendlySAM(ps, torch.optim.AdamW, 0.05, lmbda=0.6, lr=1e-4, **kw),
    "vasso": lambda ps, **kw: samopt.VaSSO(ps, torch.optim.AdamW, 0.05, theta=0.5, lr=1e-4, **kw),
    "wsam": lambda ps, **kw: samopt.WSAM(ps, torch.optim.AdamW, 0.05, gamma=0.8, lr=1e-4, **kw),
}


@pytest.mark.parametrize("variant", list(HF_PUBLISHED))
def test_trainer_runs_the_published_variants_as_the_plain_loop_does(tmp_path, variant):
    make = HF_PUBLISHED[variant]
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    settings = args(tmp_path, max_steps=3, lr_scheduler_type="linear")
    data = Pairs(n=24)  # one epoch: the sampler of a second would draw from the RNG between the dropout masks
    trainer = Recording(model=model, args=settings, train_dataset=data, optimizers=(make(model.parameters()), None))
    trainer.model_accepts_loss_kwargs = False  # the mean over the window, as the plain loop (see above)
    trainer.train()
    assert len(trainer.seen) == 6  # 3 updates x 2 micro-batches
    opt = make(reference.parameters(), max_grad_norm=0.5)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=3)
    reference.train()
    set_rng_state(trainer.rng)
    for w in range(3):
        opt.step(window_closure(reference, trainer.seen[2 * w : 2 * w + 2]))
        sched.step()
    assert opt.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"] == 0.0  # the schedule's end
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    initial = minilm().to(DEVICE).parameters()
    moved = max(float((a - b).abs().max().detach()) for a, b in zip(model.parameters(), initial, strict=True))
    assert moved > 100 * 1e-6  # it trained, by far more than the tolerance


def momentum_sam(model):
    return samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-2, momentum=0.9)


def momentum_delta(model):
    return samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, seed=0, lr=1e-2, momentum=0.9)


@pytest.mark.parametrize("make", [momentum_sam, momentum_delta])
def test_trainer_fp16_overflow_skips_the_update_and_the_lr_step(tmp_path, make):
    model = minilm()
    before = copy.deepcopy(model).to(DEVICE)
    opt = make(model)
    settings = args(tmp_path, fp16=True, lr_scheduler_type="linear", warmup_steps=1)
    trainer = SAMTrainer(model=model, args=settings, train_dataset=Pairs(), optimizers=(opt, None))
    hf_fp16(trainer, init_scale=2.0**100)  # a scale no fp16 gradient survives
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**98  # both updates overflowed and were skipped
    assert trainer.lr_scheduler.last_epoch == 0 and not opt.state  # no LR step, no momentum buffer
    for (name, a), b in zip(model.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(a, b), name


def delta(model, **kw):
    return samopt.DeltaSAM(model.parameters(), torch.optim.AdamW, rho=0.05, seed=0, lr=1e-4, weight_decay=0.01, **kw)


def delta_sgd(model, **kw):
    return samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, seed=0, lr=1e-2, **kw)


def delta_logit(model, **kw):
    return delta(model, estimator="logit", **kw)


@pytest.mark.parametrize(
    "precision, make, atol",
    [("fp32", delta, 1e-6), ("fp32", delta_logit, 1e-6)] + [(p, delta_sgd, 1e-5) for p in MIXED],
)
def test_trainer_runs_delta_sam_over_each_accumulation_window(tmp_path, precision, make, atol):
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    settings = args(tmp_path, logging_steps=1, bf16=precision == "bf16", fp16=precision == "fp16")
    trainer = Recording(model=model, args=settings, train_dataset=Pairs(), optimizers=(make(model), None))
    if precision == "fp16":
        hf_fp16(trainer)
    trainer.train()
    opt = make(reference, max_grad_norm=0.5)  # probes with the same seed, the window as one batch
    scaler = grad_scaler(precision)
    reference.train()
    set_rng_state(trainer.rng)
    losses = []
    for window in (trainer.seen[:2], trainer.seen[2:]):

        def closure(window=window):
            parts = []
            for batch in window:
                with autocast(precision):
                    logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
                parts.append((F.cross_entropy(logits.float(), batch["labels"], reduction="none"), logits))
            return torch.cat([p[0] for p in parts]), [p[1] for p in parts]

        losses.append(float(opt.step(closure, scaler=scaler)))
        scaler.update()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=0), name
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged == pytest.approx(losses, rel=1e-4)  # the window's mean loss, as for any optimizer


def test_trainer_runs_msam_as_a_plain_step_and_evaluates_and_saves_its_true_weights(tmp_path):
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    opt = samopt.MSAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-4, weight_decay=0.01)
    forwards = count_forwards(model)
    trainer = Recording(model=model, args=args(tmp_path), train_dataset=Pairs(), optimizers=(opt, None))
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    assert len(forwards) == 4  # one pass per micro-batch
    # the plain loop: a window's two micro-batches, the Trainer's clipping at 0.5, MSAM's step
    plain = samopt.MSAM(reference.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-4, weight_decay=0.01)
    reference.train()
    set_rng_state(trainer.rng)
    for window in (trainer.seen[:2], trainer.seen[2:]):
        plain.zero_grad()
        for inputs in window:
            (reference(**inputs).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        plain.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name  # both at w~
    with plain.true_weights():
        true = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    trainer.save_model(str(tmp_path / "saved"))
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").state_dict()
    moved = max(float((saved[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert moved > 1e-4  # the model rests at w~, away from what was saved ...
    assert all(torch.allclose(saved[k].to(DEVICE), true[k], atol=1e-6, rtol=0) for k in true)  # ... which is w


def test_trainer_refuses_other_optimizers(tmp_path):
    model = minilm()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, max_steps=1), train_dataset=Pairs(8), optimizers=(plain, None)
    )
    with pytest.raises(TypeError, match=r"SAMTrainer needs a samopt\.SAM optimizer"):
        trainer.train()
    # per-instance SAM drives the engine its own way: through SAM's protocol it would silently be plain SAM
    per_instance = samopt.PerInstanceSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, max_steps=1), train_dataset=Pairs(8), optimizers=(per_instance, None)
    )
    with pytest.raises(
        TypeError, match=r"SAMTrainer needs a samopt\.SAM optimizer .*or samopt\.MSAM .*got PerInstanceSAM"
    ):
        trainer.train()
    opt = sam(model, max_grad_norm=2.0)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=Pairs(8), optimizers=(opt, None))
    with pytest.raises(
        ValueError, match=r"max_grad_norm is set twice: 2\.0 on the optimizer and 0\.5 in TrainingArguments"
    ):
        trainer.train()


def test_trainer_checkpoint_resume_keeps_the_sparse_mask_and_optimizer_state(tmp_path):
    def trainer(out, model):
        mask = samopt.masks.DynamicSparseMask(0.5, total_steps=4, update_interval=1, seed=0)
        opt = sam(model, mask=mask)
        settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
        return SAMTrainer(model=model, args=args(out, **settings), train_dataset=Pairs(), optimizers=(opt, None))

    whole = minilm()
    trainer(tmp_path / "a", whole).train()
    resumed = minilm()
    t = trainer(tmp_path / "b", resumed)
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["samopt"]["ascent"]["masks"] is not None and saved["state"]  # masks and AdamW moments are saved
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert t.optimizer.optimizer.mask.state_dict()["steps"] == 4


def test_sharpness_of_a_hugging_face_classifier_with_named_inputs():
    """Dict batches through ``model(**batch).loss``; SDPA attention runs on its twice-differentiable math backend."""
    from samopt import diagnostics

    model = minilm().train()
    data = Pairs(8, 32)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}

    def loss_fn(m, b):
        return m(**b).loss

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with diagnostics.preserved(model, "eval") as params:
        gen = torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen) for p in params]
        reverse = diagnostics.hvp(model, loss_fn, [batch], params, v)
        forward = diagnostics.hvp(model, loss_fn, [batch], params, v, method="forward")
    scale = max(float(r.abs().max()) for r in reverse)
    assert scale > 0 and all(
        torch.allclose(f, r, rtol=1e-3, atol=1e-5 * scale) for f, r in zip(forward, reverse, strict=True)
    )
    top = diagnostics.top_eigenvalues(model, loss_fn, [batch], max_iter=3, bn="eval")
    sharp = diagnostics.m_sharpness(model, loss_fn, [batch], rho=0.01, steps=1, bn="eval")
    assert top.hvps == 3 and top.values[0] != 0 and sharp.value >= 0 and sharp.passes == 3
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------ Lightning

import lightning  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from samopt.integrations.lightning import SAMModule  # noqa: E402


def mlp_with_bn_and_dropout(p: float = 0.2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Dropout(p),
        torch.nn.Linear(32, 3),
    )


class Classifier(SAMModule):
    def __init__(self, net, accumulate=2, mask=None, schedule=None):
        super().__init__(accumulate_grad_batches=accumulate)
        self.net, self.mask, self.schedule, self.seen, self.losses = net, mask, schedule, [], 0

    def sam_loss(self, batch):
        x, y = batch
        self.losses += 1
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if not self.seen:
            self.rng = rng_state()
        self.seen.append(batch)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = samopt.SAM(
            self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, mask=self.mask, schedule=self.schedule
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(batches: int = 6):
    g = torch.Generator().manual_seed(1)
    n = 8 * batches
    data = torch.utils.data.TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)  # by default 3 updates of 2 batches per epoch


def lightning_precision(precision, init_scale=None):
    """The Trainer arguments for ``precision``. Lightning refuses ``"16-mixed"`` on the CPU, but runs its fp16
    plugin there when given one: autocast to fp16 and a GradScaler, as on a GPU."""
    if precision == "fp16" and (init_scale is not None or not CUDA):
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=init_scale or 2.0**16)
        return {"plugins": [MixedPrecision("16-mixed", DEVICE.type, scaler=scaler)]}
    return {"precision": {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[precision]}


def lightning_trainer(tmp_path, **kw):
    settings = {
        "max_epochs": 1,
        "accelerator": "gpu" if CUDA else "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    return lightning.Trainer(**{**settings, **kw})


def fit(module, tmp_path, precision="fp32", batches=6, **kw):
    trainer = lightning_trainer(tmp_path, **lightning_precision(precision), **kw)
    trainer.fit(module, loader(batches))
    return trainer


def test_lightning_refuses_a_plateau_scheduler_it_cannot_step(tmp_path):
    class Plateau(Classifier):
        def configure_optimizers(self):
            opt = samopt.SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}

    with pytest.raises(TypeError, match="a ReduceLROnPlateau needs the metric it monitors, which Lightning drops"):
        fit(Plateau(mlp_with_bn_and_dropout()), tmp_path)


def test_lightning_refuses_per_instance_sam(tmp_path):
    class PerInstance(Classifier):
        def configure_optimizers(self):
            return samopt.PerInstanceSAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    with pytest.raises(TypeError, match=r"SAMModule needs configure_optimizers\(\) to return one samopt\.SAM .*got "
                       r"PerInstanceSAM"):  # fmt: skip
        fit(PerInstance(mlp_with_bn_and_dropout()), tmp_path)


# 5 batches: the epoch's last window has one batch, whose loss is still divided by 2, as Lightning's own
# accumulation does
@pytest.mark.parametrize(
    "precision, batches, every", [(p, 6, 1) for p in ("fp32", *MIXED)] + [("fp32", 5, 1), ("fp32", 6, 2)]
)
def test_lightning_module_equals_the_plain_samopt_loop(tmp_path, precision, batches, every):
    schedule = samopt.schedules.EveryK
    module = Classifier(mlp_with_bn_and_dropout(), schedule=schedule(every))
    trainer = fit(module, tmp_path, precision, batches)
    assert trainer.global_step == 3 and len(module.seen) == batches
    assert module.losses == (2 * batches if every == 1 else 2 * 4 + 2)  # with k = 2, update 1 runs each batch once
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, schedule=schedule(every))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = grad_scaler(precision)
    net.train()
    set_rng_state(module.rng)
    for w in range(3):
        window = module.seen[2 * w : 2 * w + 2]

        def closure(window=window):
            for x, y in window:
                with autocast(precision):
                    loss = F.cross_entropy(net(x), y) / 2
                scaler.scale(loss).backward()
            return loss

        opt.step(closure, scaler=scaler)
        scaler.update()
        sched.step()
    if precision == "fp16":
        assert scaler.get_scale() == trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)  # weights and BN statistics
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


class SubBatchClassifier(Classifier):
    def configure_optimizers(self):
        ascent = samopt.sub_batch.SubBatchAscent(2)
        return samopt.SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, ascent=ascent)


def test_lightning_sub_batch_ascent_equals_the_plain_loop(tmp_path):
    module = SubBatchClassifier(mlp_with_bn_and_dropout())
    fit(module, tmp_path)
    assert module.losses == 2 * 6  # each batch: its first half at w, all of it at w + e
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.SAM(
        net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, ascent=samopt.sub_batch.SubBatchAscent(2)
    )
    net.train()
    set_rng_state(module.rng)
    for w in range(3):

        def closure(p, window=module.seen[2 * w : 2 * w + 2]):
            for batch in window:
                x, y = p.take(batch)
                loss = F.cross_entropy(net(x), y) / 2
                loss.backward()
            return loss

        opt.step(closure)
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


def plain_loop(module, net, opt, sched=None) -> None:
    """The 3 updates of 2 batches the module saw, in a plain loop over ``net`` (the module's dropout masks), and
    the module's weights and BatchNorm statistics equal to the loop's."""
    net.train()
    set_rng_state(module.rng)
    for w in range(3):

        def closure(window=module.seen[2 * w : 2 * w + 2]):
            for x, y in window:
                loss = F.cross_entropy(net(x), y) / 2
                loss.backward()
            return loss

        opt.step(closure)
        if sched is not None:
            sched.step()
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


#: The published variants as a user would configure them, rho following the StepLR schedule (GSAM), an EMA
#: (Friendly-SAM, VaSSO), the decoupled step after the base step (WSAM).
PUBLISHED = {
    "gsam": lambda ps: samopt.GSAM(ps, torch.optim.SGD, 0.1, alpha=0.3, rho_min=0.02, lr=0.1, momentum=0.9),
    "friendly-sam": lambda ps: samopt.FriendlySAM(ps, torch.optim.SGD, 0.1, lmbda=0.6, lr=0.1, momentum=0.9),
    "vasso": lambda ps: samopt.VaSSO(ps, torch.optim.SGD, 0.1, theta=0.5, lr=0.1, momentum=0.9),
    "wsam": lambda ps: samopt.WSAM(ps, torch.optim.SGD, 0.1, gamma=0.8, lr=0.1, momentum=0.9),
}


class VariantClassifier(Classifier):
    def __init__(self, net, variant):
        super().__init__(net)
        self.variant = variant

    def configure_optimizers(self):
        opt = PUBLISHED[self.variant](self.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_lightning_runs_the_published_variants_as_the_plain_loop_does(tmp_path, variant):
    module = VariantClassifier(mlp_with_bn_and_dropout(), variant)
    fit(module, tmp_path)
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = PUBLISHED[variant](net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    plain_loop(module, net, opt, sched)
    assert not torch.equal(next(net.parameters()), next(mlp_with_bn_and_dropout().parameters()))  # it trained


class SamOnClassifier(Classifier):
    def configure_optimizers(self):
        return samopt.SAM(self.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, mask=samopt.masks.sam_on(self.net))


def test_lightning_sam_on_skips_the_clean_gradients_it_does_not_need_and_equals_the_plain_loop(tmp_path):
    module = SamOnClassifier(mlp_with_bn_and_dropout())
    head = count_grads(module.net[-1].weight)
    fit(module, tmp_path)
    assert len(head) == 2 * 2 + 2 * 2  # update 0 (its mask is due): 2 clean + 2 perturbed passes; then perturbed only
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, mask=samopt.masks.sam_on(net))
    plain_loop(module, net, opt)


class MomentumClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        self.validated.append([p.detach().clone() for p in self.net.parameters()])

    def configure_optimizers(self):
        return samopt.MSAM(self.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)


def test_lightning_msam_equals_the_plain_loop_and_validates_and_saves_the_true_weights(tmp_path):
    module = MomentumClassifier(mlp_with_bn_and_dropout())
    module.validated = []
    trainer = lightning_trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, loader(), loader(1))
    assert module.losses == 6 and trainer.global_step == 3  # one pass per batch, one update per window of 2
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.MSAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    net.train()
    set_rng_state(module.rng)
    for w in range(3):
        opt.zero_grad()
        for x, y in module.seen[2 * w : 2 * w + 2]:
            (F.cross_entropy(net(x), y) / 2).backward()
        opt.step()
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)  # both at w~
    with opt.true_weights():
        true = [p.detach().clone() for p in net.parameters()]
        true_state = {k: v.clone() for k, v in net.state_dict().items()}
    assert len(module.validated) == 1
    for a, b in zip(module.validated[0], true, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)  # validated at w
    assert not torch.allclose(module.validated[0][0], next(module.net.parameters()), atol=1e-4)  # and left at w~
    trainer.save_checkpoint(tmp_path / "msam.ckpt")
    saved = torch.load(tmp_path / "msam.ckpt", weights_only=False)["state_dict"]
    for k, v in true_state.items():
        assert torch.allclose(saved[f"net.{k}"], v, atol=1e-6, rtol=0), k  # the checkpoint holds w


def test_lightning_checkpoint_resume(tmp_path):
    # no dropout: Lightning's checkpoints do not hold the global RNG, so dropout masks would differ after a resume
    whole = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    fit(whole, tmp_path / "a", max_epochs=2)
    first = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    trainer = fit(first, tmp_path / "b", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    lightning_trainer(tmp_path / "c", max_epochs=2).fit(resumed, loader(), ckpt_path=str(tmp_path / "one.ckpt"))
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


class DeltaClassifier(Classifier):
    estimator = "probe"

    def sam_per_example_loss(self, batch):
        x, y = batch
        logits = self.net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    def configure_optimizers(self):
        return samopt.DeltaSAM(
            self.parameters(), torch.optim.SGD, rho=0.1, seed=0, estimator=self.estimator, lr=0.1, momentum=0.9
        )


@pytest.mark.parametrize("precision, estimator", [(p, "probe") for p in ("fp32", *MIXED)] + [("fp32", "logit")])
def test_lightning_delta_sam_equals_the_plain_loop(tmp_path, precision, estimator):
    module = DeltaClassifier(mlp_with_bn_and_dropout())
    module.estimator = estimator
    trainer = fit(module, tmp_path, precision)
    assert trainer.global_step == 3
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.DeltaSAM(net.parameters(), torch.optim.SGD, rho=0.1, seed=0, estimator=estimator, lr=0.1, momentum=0.9)
    scaler = grad_scaler(precision)
    net.train()
    set_rng_state(module.rng)
    for w in range(3):
        window = module.seen[2 * w : 2 * w + 2]

        def closure(window=window):
            parts = []
            for x, y in window:
                with autocast(precision):
                    logits = net(x)
                    parts.append((F.cross_entropy(logits, y, reduction="none"), logits))
            return torch.cat([p[0] for p in parts]), [p[1] for p in parts]

        opt.step(closure, scaler=scaler)
        scaler.update()
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("module_class", [Classifier, DeltaClassifier])
def test_lightning_fp16_overflow_skips_the_update_and_the_lr_step(tmp_path, module_class):
    module = module_class(mlp_with_bn_and_dropout())
    before = copy.deepcopy(module.net)
    trainer = lightning_trainer(tmp_path, **lightning_precision("fp16", init_scale=2.0**100))
    trainer.fit(module, loader())
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**97  # the 3 updates overflowed and were skipped
    opt = module.optimizers().optimizer
    assert not opt.state and opt.param_groups[0]["lr"] == 0.1  # no momentum buffer, no LR step
    for a, b in zip(module.net.parameters(), before.parameters(), strict=True):
        assert torch.equal(a, b)


def test_trainer_with_a_fisher_mask_over_named_inputs(tmp_path):
    model = minilm()
    data = Pairs(8)
    fisher_data = [({k: v[:4] for k, v in data.enc.items()}, data.labels[:4])]  # Hugging Face keyword inputs
    opt = samopt.SSAMF(
        model.parameters(),
        torch.optim.AdamW,
        model=model,
        fisher_data=fisher_data,
        loss_fn=F.cross_entropy,
        rho=0.05,
        sparsity=0.5,
        num_samples=4,
        update_interval=1,
        lr=1e-4,
    )
    SAMTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, optimizers=(opt, None)).train()
    assert opt.mask_density() == pytest.approx(0.5, abs=1e-6) and opt.mask.position == 4


class MiniLMModule(SAMModule):
    def __init__(self, model):
        super().__init__(accumulate_grad_batches=2)
        self.model, self.seen = model, []

    def sam_loss(self, batch):
        if not self.seen:
            self.rng = rng_state()
        if len(self.seen) < 4:
            self.seen.append(batch)
        return self.model(**batch).loss

    def configure_optimizers(self):
        return sam(self.model)


def test_lightning_on_the_packaged_minilm_equals_the_plain_loop(tmp_path):
    model = minilm().train()  # from_pretrained returns eval mode, which Lightning (>= 2.2) leaves as it is
    reference = copy.deepcopy(model)
    module = MiniLMModule(model)
    data = torch.utils.data.DataLoader(Pairs(8), batch_size=4)  # one update of 2 accumulated batches
    lightning_trainer(tmp_path).fit(module, data)
    reference.to(DEVICE)
    opt = sam(reference)
    reference.train()
    set_rng_state(module.rng)
    opt.step(window_closure(reference, module.seen[:2]))  # sam_loss saw the two batches at w, then at w + e
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
