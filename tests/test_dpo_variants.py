"""DPO loss variants (TRL's --loss_type, --loss_weights, --f_divergence_type, --ld_alpha, --use_weighting) on packed
pairs: one training step gives the loss, LoRA gradients and logged rewards of TRL's padded step on the same batch and
weights, also when the batch runs as rows of one pair each; what cannot be packed falls back with a log line; ipo
trains through dpo_training.py, packed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_script
from test_dpo_orpo import COMMON, _dpo_setup, _perturb_adapter
from test_reward_model import sample_pairs

# (id, flags): every loss type of TRL 1.16's DPOConfig, several at once, and the options that change the log-probs
# or the weights. exo_pair needs label smoothing > 0; robust, aot and aot_unpaired use it.
VARIANTS = [
    ("sigmoid", []),
    ("hinge", ["--loss_type", "hinge"]),
    ("ipo", ["--loss_type", "ipo"]),
    ("exo_pair", ["--loss_type", "exo_pair", "--label_smoothing", "1e-3"]),
    ("nca_pair", ["--loss_type", "nca_pair"]),
    ("robust", ["--loss_type", "robust", "--label_smoothing", "0.1"]),
    ("bco_pair", ["--loss_type", "bco_pair"]),
    ("sppo_hard", ["--loss_type", "sppo_hard"]),
    ("aot", ["--loss_type", "aot", "--label_smoothing", "0.1"]),
    ("aot_unpaired", ["--loss_type", "aot_unpaired", "--label_smoothing", "0.1"]),
    ("apo_zero", ["--loss_type", "apo_zero"]),
    ("apo_down", ["--loss_type", "apo_down"]),
    ("discopop", ["--loss_type", "discopop"]),
    ("sft", ["--loss_type", "sft"]),
    ("sigmoid_norm", ["--loss_type", "sigmoid_norm"]),
    ("sigmoid+sft", ["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"]),
    ("ipo+hinge+nca", ["--loss_type", "ipo", "hinge", "nca_pair", "--loss_weights", "0.3", "1.0", "2.0"]),
    ("forward_kl", ["--f_divergence_type", "forward_kl"]),
    ("js_ipo", ["--loss_type", "ipo", "--f_divergence_type", "js_divergence"]),
    ("alpha_robust", ["--loss_type", "robust", "--label_smoothing", "0.1", "--f_divergence_type",
                      "alpha_divergence", "--f_alpha_divergence_coef", "0.3"]),
    ("ld_alpha", ["--loss_type", "sigmoid", "sft", "--ld_alpha", "0.3"]),
    ("wpo", ["--loss_type", "sigmoid", "--use_weighting", "True"]),
    ("wpo_ld_ipo", ["--loss_type", "ipo", "--use_weighting", "True", "--ld_alpha", "0.5"]),
]  # (TRL's padded step fails with --use_weighting for hinge and sft: it scales their loss tensor in place)
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return sample_pairs(tmp_path_factory.mktemp("dpo-variants"), 3, 1)  # one batch of 4 pairs of different lengths


def dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing, max_tokens=None):
    """One training step of MedDPOTrainer on the first batch, the adapter perturbed so the policy is not the
    reference: (trainer, loss, LoRA gradients, mean logged metrics); trainer.rows_seen lists the pairs of each row
    the step computed a loss on."""
    from medgpt.trainers.dpo import MedDPOTrainer

    model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path, *flags)
    trainer = MedDPOTrainer(packing=packing, max_packed_tokens=max_tokens, model=model, args=args,
                            train_dataset=train, processing_class=tok)
    assert trainer.packed == packing
    _perturb_adapter(model)  # after TRL's set-up: the reference is the base (adapter disabled)
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.rows_seen = []
    compute_loss = trainer._compute_loss

    def counting(model, inputs, return_outputs):
        trainer.rows_seen.append(len(inputs.get("pair_lens", ())))
        return compute_loss(model, inputs, return_outputs)

    trainer._compute_loss = counting
    model.zero_grad()
    loss = trainer.training_step(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return trainer, loss.item(), grads, metrics


@pytest.mark.parametrize("flags", [f for _, f in VARIANTS], ids=[name for name, _ in VARIANTS])
def test_packed_variant_matches_trl_padded_step(tiny_model_dir, pairs_dir, tmp_path, flags):
    """TRL's padded step is the reference; packed runs with rows of one pair each (max_packed_tokens 1), so the
    rows' losses must add up to the batch's (losses over the whole batch, aot's sorts, keep it in one row)."""
    _, loss_pad, grads_pad, m_pad = dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing=False)
    trainer, loss_packed, grads_packed, m_packed = dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing=True,
                                                            max_tokens=1)
    # the batch's 4 pairs ran as 4 rows, or (aot, aot_unpaired: sorted over the batch) as one
    assert trainer.rows_seen == ([4] if "--loss_type" in flags and "aot" in flags[flags.index("--loss_type") + 1]
                                 else [1, 1, 1, 1])
    assert math.isfinite(loss_pad) and abs(loss_pad) > 1e-4  # a loss that says something
    assert loss_packed == pytest.approx(loss_pad, rel=5e-5, abs=1e-5)
    assert grads_pad.keys() == grads_packed.keys() and len(grads_pad) > 0
    scale = max(g.abs().max().item() for g in grads_pad.values())
    assert scale > 1e-4
    # float error of the log-probs, amplified by some losses (discopop's 1/tau = 20, forward_kl's exp): 1e-3 of the
    # largest gradient; a wrong formula is off by far more
    for name in grads_pad:
        torch.testing.assert_close(grads_packed[name], grads_pad[name], atol=1e-3 * scale, rtol=1e-3)
    for key in REWARDS:
        assert m_packed[key] == pytest.approx(m_pad[key], rel=1e-3, abs=1e-4), key


def test_batch_sorting_losses_keep_the_batch_whole_and_say_so(tiny_model_dir, pairs_dir, tmp_path, caplog):
    """aot sorts the batch's log-ratios: computed one pair at a time, as rows of a split batch would, it is another
    loss; so such a batch runs as one row (logged). (On the test batch the policy ranks the pairs as the reference
    does, so there the split would go unnoticed by the loss: the rows are counted in the test above.)"""
    from medgpt.trainers.dpo import dpo_loss

    flags = ["--loss_type", "aot", "--label_smoothing", "0.1"]
    with caplog.at_level("INFO", logger="medgpt.dpo"):
        trainer, _, _, _ = dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing=True, max_tokens=1)
    assert trainer.whole_batch == ["aot"] and trainer.rows_seen == [4]
    assert "loss_type ['aot'] is computed over the whole batch" in caplog.text
    torch.manual_seed(0)
    logps, ref = torch.randn(4, 2) * 5, torch.randn(4, 2) * 5
    lens = torch.tensor([3.0, 5.0, 7.0, 9.0])
    whole = dpo_loss(trainer.args, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], lens, lens)
    rows = sum(dpo_loss(trainer.args, logps[i:i + 1, 0], logps[i:i + 1, 1], ref[i:i + 1, 0], ref[i:i + 1, 1],
                        lens[i:i + 1], lens[i:i + 1], batch_pairs=4) for i in range(4))
    assert abs(whole.item() - rows.item()) > 1e-3


def test_dpo_loss_is_trls_formula_for_hand_values():
    """A few loss types computed by hand from the papers' formulas (TRL's), on made-up log-probs."""
    from types import SimpleNamespace

    from medgpt.trainers.dpo import dpo_loss

    def args(loss_type, **kw):
        base = dict(beta=0.5, label_smoothing=0.0, loss_type=loss_type, loss_weights=None, discopop_tau=0.05,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5)
        return SimpleNamespace(**{**base, **kw})

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -12.0))
    cl, rl = torch.tensor([4.0]), torch.tensor([8.0])
    delta = (pc - rc) - (pr - rr)  # 3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cases = {
        "sigmoid": -math.log(sig(0.5 * 3)),
        "hinge": max(0.0, 1 - 0.5 * 3),
        "ipo": ((1 / 4) - (-2 / 8) - 1 / (2 * 0.5)) ** 2,  # log-ratios averaged per token: 1/4 - (-2)/8
        "sppo_hard": (1 - 0.5 / 0.5) ** 2 + (-2 + 0.5 / 0.5) ** 2,
        "sft": 10.0 / 4,  # -(chosen log-prob) / chosen tokens
        "apo_zero": (1 - sig(0.5)) + sig(-1.0),
    }
    for loss_type, expected in cases.items():
        assert dpo_loss(args([loss_type]), pc, pr, rc, rr, cl, rl).item() == pytest.approx(expected, rel=1e-6), \
            loss_type
    both = dpo_loss(args(["sigmoid", "sft"], loss_weights=[2.0, 0.1]), pc, pr, rc, rr, cl, rl).item()
    assert both == pytest.approx(2 * cases["sigmoid"] + 0.1 * cases["sft"], rel=1e-6)
    assert delta.item() == 3.0


def test_precomputed_reference_falls_back_to_padding_with_a_log_line(tiny_model_dir, pairs_dir, tmp_path, caplog):
    from medgpt.trainers.dpo import MedDPOTrainer

    model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path, "--loss_type", "ipo",
                                         "--precompute_ref_log_probs", "True")
    with caplog.at_level("WARNING", logger="medgpt.dpo"):
        trainer = MedDPOTrainer(packing=True, model=model, args=args, train_dataset=train, processing_class=tok)
    assert not trainer.packed
    assert "DPO packing off: --precompute_ref_log_probs is set" in caplog.text
    assert "attention_mask" in next(iter(trainer.get_train_dataloader()))


def test_ipo_trains_packed_through_the_script(tmp_path, tiny_model_dir, pairs_dir):
    out = tmp_path / "dpo-ipo"
    proc = run_script("dpo_training.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir),
                      "--output_dir", str(out), "--do_train", "--max_steps", "3", "--learning_rate", "5e-3",
                      "--beta", "0.1", "--loss_type", "ipo", "--warmup_steps", "0", "--per_device_train_batch_size",
                      "2", *COMMON[2:], env={"OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert "DPO: each pair packed as prompt + chosen + rejected" in log and "loss_type ['ipo']" in log
    assert "DPO packing off" not in log
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # IPO at policy == reference: (0 - 1 / (2 beta))^2 = 25; the steps move the per-token log-ratio margin up
    assert losses[0] == pytest.approx(25.0, rel=1e-4)
    assert losses[-1] < losses[0]
    assert (out / "adapter_model.safetensors").is_file()


def test_dpo_script_sends_reference_free_losses_to_cpo_training(tmp_path, tiny_model_dir, pairs_dir):
    for loss_type, message in (("simpo", "cpo_training.py --loss_type simpo"),
                               ("kto", "not one of TRL's DPO losses")):
        proc = run_script("dpo_training.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
                          str(pairs_dir), "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none",
                          "--loss_type", loss_type, check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --loss_type {loss_type}") and message in last, last
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_weighting_on_losses_trl_cannot_weight(tiny_model_dir, pairs_dir, tmp_path, loss_type):
    """TRL 1.16's padded step scales hinge's and sft's loss tensor in place under --use_weighting and fails in
    backward; the packed step computes TRL's formula (sft x WPO is no sum over pairs: one row)."""
    flags = ["--loss_type", loss_type, "--use_weighting", "True"]
    with pytest.raises(RuntimeError):
        dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing=False)
    trainer, loss, grads, _ = dpo_step(tiny_model_dir, pairs_dir, tmp_path, flags, packing=True, max_tokens=1)
    assert math.isfinite(loss) and loss > 0 and any(g.abs().sum() > 0 for g in grads.values())
    assert trainer.rows_seen == ([4] if loss_type == "sft" else [1, 1, 1, 1])
    _, plain, _, _ = dpo_step(tiny_model_dir, pairs_dir, tmp_path, ["--loss_type", loss_type], packing=True)
    assert abs(loss - plain) > 1e-4  # the WPO weights took part
