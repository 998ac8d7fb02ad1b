"""Batched and data-parallel PDM training (issue 12): a padded batch equals the same conversations
one by one, DP=2 equals one process on the same global batch, resume works at another world size,
and a batch the world size cannot split fails in one line on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from multiproc import run_distributed
from tiny_models import byte_tokenizer

from spd_megatron.config import SPDConfig
from spd_megatron.convert.checkpoint import read_arch
from spd_megatron.draft.pdm import PDMConfig, PipelineDraftModule, init_from_target
from spd_megatron.draft.training.batches import shard
from spd_megatron.draft.training.data import encode
from spd_megatron.draft.training.trainer import PDMTrainer, Teacher
from spd_megatron.engine import build_stage
from spd_megatron.errors import SPDError
from spd_megatron.parallel.data_parallel import init_data_parallel
from helpers import tiny_config

REPLIES = ["one two three four five", "a much longer reply that goes on and on for a while", "ok",
           "the fourth answer, of middling length"]
TOL = dict(rtol=2e-4, atol=2e-6)
FEATURE_TOL = dict(rtol=2e-4, atol=1e-5)  # logits ~1: a padded batch's GEMMs block the sums differently


def conversations(max_len=60):
    tok = byte_tokenizer()
    return [encode(tok, [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": reply}], max_len) for i, reply in enumerate(REPLIES)]


def build(ckpt, dp=None, vocab=tuple(range(0, 260, 2)) + (258,)):
    cfg = tiny_config(ckpt)
    ctx, dp_ctx = init_data_parallel(cfg.parallel)
    arch = read_arch(ckpt)
    teacher = Teacher(build_stage(cfg, ctx, ckpt, arch), [0, 2, 4])
    torch.manual_seed(0)
    module = PipelineDraftModule(PDMConfig([2, 2], [0, 2, 4], 1, sorted(set(vocab)), arch.to_dict()), arch,
                                 max_seq_len=96)
    with torch.no_grad():
        init_from_target(module, ckpt)
    trainer = PDMTrainer(module, lr=1e-3, warmup=1, total_steps=10, dp=dp_ctx if dp else None)
    return teacher, trainer, dp_ctx


def grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}


def assert_same_step(a, b):
    (loss_a, agree_a, n_a), ga = a
    (loss_b, agree_b, n_b), gb = b
    assert n_a == n_b > 0
    torch.testing.assert_close(torch.tensor(loss_a), torch.tensor(loss_b), **TOL)
    assert agree_a == pytest.approx(agree_b, rel=1e-6, abs=1e-9)
    assert ga.keys() == gb.keys() and len(ga) > 3
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL, msg=name)


def _batch_worker(rank, world_size, ckpt):
    examples = conversations()
    fills = [2, 1, 2, 1]
    teacher, one_by_one, _ = build(ckpt)
    teacher.restrict(one_by_one.module.vocab_ids)
    single = [teacher.features(ex) for ex in examples]
    batched = teacher.features_batch(examples)  # one padded teacher forward
    for s, b in zip(single, batched):
        torch.testing.assert_close(s.logits, b.logits, **FEATURE_TOL)
        assert torch.equal(s.targets, b.targets) and s.draft and b.draft
        for k in s.anchors:
            torch.testing.assert_close(s.anchors[k], b.anchors[k], **FEATURE_TOL)
    step_a = one_by_one.train_step([[f] for f in single], [[f] for f in fills]), grads(one_by_one)
    _, padded, _ = build(ckpt)
    step_b = padded.train_step([batched[:3], batched[3:]], [fills[:3], fills[3:]]), grads(padded)
    assert_same_step(step_a, step_b)


@pytest.mark.distributed
def test_a_padded_batch_equals_the_conversations_one_by_one(tiny_models):
    run_distributed(_batch_worker, 1, tiny_models["llama"][1], timeout_s=180)


def _dp_worker(rank, world_size, ckpt):
    examples = conversations()
    lengths = [len(ex.ids) for ex in examples]
    fills = [1, 2, 2, 1]
    teacher, dp_trainer, dp = build(ckpt, dp=True)
    assert dp.size == world_size == 2 and dp.rank == rank
    teacher.restrict(dp_trainer.module.vocab_ids)
    features = teacher.features_batch(examples)
    mine = shard(list(range(4)), lengths, rank, world_size)
    assert mine and len(shard(list(range(4)), lengths, 1 - rank, world_size)) == 4 - len(mine)
    step_dp = dp_trainer.train_step([[features[i] for i in mine]], [[fills[i] for i in mine]]), grads(dp_trainer)
    _, reference, _ = build(ckpt)  # no DP: the whole global batch on this rank
    step_ref = reference.train_step([features], [fills]), grads(reference)
    assert_same_step(step_dp, step_ref)
    for p, q in zip(dp_trainer.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    held = dp_trainer.evaluate((features * 2)[rank::2][:4 - rank], chunk=1)  # shards of 4 and 3: no collective inside
    whole = reference.evaluate(features + features[:3])
    assert held["tokens"] == whole["tokens"]
    torch.testing.assert_close(torch.tensor(held["kl"]), torch.tensor(whole["kl"]), **TOL)


@pytest.mark.distributed
def test_dp2_equals_one_process_on_the_same_global_batch(tiny_models):
    run_distributed(_dp_worker, 2, tiny_models["llama"][1], timeout_s=180)


def write_data(path):
    with open(path, "w") as f:
        for i in range(12):
            reply = " ".join(["word"] * (3 + i % 5)) + f" number {i}"
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": reply}]}) + "\n")


def run_config(ckpt, data, out, steps, **train):
    cfg = SPDConfig()
    cfg.model.checkpoint, cfg.model.max_seq_len = str(ckpt), 96
    cfg.parallel.timeout_s = 60
    keys = dict(data=str(data), max_len=48, held_out=2, num_stages=2, draft_vocab_size=0, steps=steps,
                batch_tokens=192, accumulate=2, warmup=1, eval_every=100, save_every=1, lr=2e-3, out=str(out))
    for key, value in {**keys, **train}.items():
        setattr(cfg.train, key, value)
    cfg.draft.anchors = [0, 2, 4]
    return cfg


def _resume_worker(rank, world_size, ckpt, data, out, train):
    from spd_megatron.draft.training.run import train_draft

    train_draft(run_config(ckpt, data, out, 4, **train))


def _final_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "latest" / "pdm.safetensors"))


@pytest.mark.distributed
def test_resume_at_another_world_size_continues_at_the_same_step(tiny_models, tmp_path):
    ckpt = tiny_models["llama"][1]
    data = tmp_path / "data.jsonl"
    write_data(data)
    run_distributed(_resume_worker, 1, ckpt, str(data), str(tmp_path / "one"), {}, timeout_s=240)
    stop_after_one_step = {"time_budget_min": 1e-9}
    run_distributed(_resume_worker, 2, ckpt, str(data), str(tmp_path / "two"), stop_after_one_step, timeout_s=240)
    state = torch.load(tmp_path / "two" / "latest" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1
    run_distributed(_resume_worker, 1, ckpt, str(data), str(tmp_path / "two"), {}, timeout_s=240)
    assert torch.load(tmp_path / "two" / "latest" / "trainer_state.pt", weights_only=False)["step"] == 4
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-3, atol=1e-5, msg=name)


def _bad_batch_worker(rank, world_size, ckpt, data, out):
    from spd_megatron.draft.training.run import train_draft

    with pytest.raises(SPDError, match="not divisible by the 2 data-parallel ranks") as err:
        train_draft(run_config(ckpt, data, out, 1, batch_tokens=191))
    assert "\n" not in str(err.value)


@pytest.mark.distributed
def test_a_batch_the_world_cannot_split_fails_in_one_line_on_every_rank(tiny_models, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(data)
    run_distributed(_bad_batch_worker, 2, tiny_models["llama"][1], str(data), str(tmp_path / "o"), timeout_s=120)


def _cache_worker(rank, world_size, ckpt, folder):
    from spd_megatron.draft.training.feature_cache import FeatureCache, FeatureSource, cache_key, top_k, topk_kl_sum

    examples = conversations()
    teacher, trainer, _ = build(ckpt)
    teacher.restrict(trainer.module.vocab_ids)
    cfg = trainer.module.cfg
    key = cache_key(cfg.target, ckpt, cfg.anchors, cfg.split, cfg.draft_vocab, 8, examples)
    FeatureSource(teacher, examples, FeatureCache(folder, key))([0, 1, 2, 3])  # computed, written
    cached = FeatureSource(None, examples, FeatureCache(folder, key))([3, 1, 0, 2])  # read back only
    online = teacher.features_batch([examples[i] for i in (3, 1, 0, 2)])
    kept = exact = 0.0
    count = 0
    with torch.no_grad():
        for b in online:
            valid = trainer.valid(b)
            student = trainer.forward(b, 2)[valid]
            kept += float(topk_kl_sum(top_k(b.logits[valid], 8), student)[0])
            exact += float(trainer._kl_sum(b.logits[valid], student)[0])
            full = topk_kl_sum(top_k(b.logits[valid], b.logits.shape[1]), student)[0]  # k = V_d: exact
            torch.testing.assert_close(full, trainer._kl_sum(b.logits[valid], student)[0], **TOL)
            count += int(valid.sum())
    got = trainer.evaluate(cached)
    assert got["tokens"] == count > 0
    torch.testing.assert_close(torch.tensor(got["kl"]), torch.tensor(kept / count), **TOL)
    assert kept < exact  # one bucket for the rest can only lose information
    with pytest.raises(SPDError, match="made for another target or layout .differs in: anchors") as err:
        FeatureCache(folder, {**key, "anchors": [0, 1, 4]})
    assert "\n" not in str(err.value)


@pytest.mark.distributed
def test_the_feature_cache_reproduces_the_online_loss_on_the_kept_mass(tiny_models, tmp_path):
    run_distributed(_cache_worker, 1, tiny_models["llama"][1], str(tmp_path / "cache"), timeout_s=180)


@pytest.mark.distributed
def test_a_cached_run_trains_and_resumes(tiny_models, tmp_path):
    ckpt = tiny_models["llama"][1]
    data = tmp_path / "data.jsonl"
    write_data(data)
    cache = {"feature_cache": str(tmp_path / "cache"), "feature_top_k": 16, "draft_vocab_size": 128}
    run_distributed(_resume_worker, 2, ckpt, str(data), str(tmp_path / "run"), cache, timeout_s=240)
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert 0 < len(files) <= 10  # one per training conversation seen (10 train, 2 held out)
    record = json.loads((tmp_path / "run" / "final" / "training.json").read_text())
    assert record["steps"] == 4 and record["history"][-1]["tokens"] > 0


def _init_worker(rank, world_size, ckpt):
    from spd_megatron.draft.training.trainer import apply_init

    examples = conversations()
    teacher, trainer, _ = build(ckpt)
    module = trainer.module
    apply_init(module, "early_exit", freeze_head=True)
    trainer = PDMTrainer(module, lr=1e-2, warmup=1, total_steps=10)
    batch = teacher.features(examples[1])
    with torch.no_grad():
        got = trainer.forward(batch, 2)  # [S, V_d]
        exit_now = module.logits(batch.anchors[0])  # the head on the newest row's own features
    torch.testing.assert_close(got, exit_now, **TOL)
    head = module.head.weight.clone()
    proj = module.projections["0"].weight.clone()
    trainer.train_step(batch)
    assert torch.equal(module.head.weight, head) and not torch.equal(module.projections["0"].weight, proj)
    with pytest.raises(SPDError, match="train.init=warm is unknown"):
        apply_init(module, "warm", freeze_head=False)


@pytest.mark.distributed
def test_early_exit_init_and_a_frozen_head(tiny_models):
    run_distributed(_init_worker, 1, tiny_models["llama"][1], timeout_s=120)


def _tp_features_worker(rank, world_size, ckpt, out):
    cfg = tiny_config(ckpt, tp=world_size, pp=1)
    ctx, dp = init_data_parallel(cfg.parallel)
    assert ctx.tp_size == world_size and dp.size == 1 and dp.is_main == (rank == 0)
    teacher = Teacher(build_stage(cfg, ctx, ckpt, read_arch(ckpt)), [0, 2, 4])
    features = teacher.features_batch(conversations())
    if world_size == 1:
        torch.save([(b.anchors, b.logits) for b in features], out)
        return
    for (anchors, logits), b in zip(torch.load(out), features):
        torch.testing.assert_close(b.logits, logits, rtol=1e-4, atol=1e-4)
        for k in anchors:
            torch.testing.assert_close(b.anchors[k], anchors[k], rtol=1e-4, atol=1e-4)  # fp32, other sum order


@pytest.mark.distributed
def test_a_tp2_teacher_gives_the_tp1_features(tiny_models, tmp_path):
    ckpt, out = tiny_models["llama"][1], str(tmp_path / "tp1.pt")
    run_distributed(_tp_features_worker, 1, ckpt, out, timeout_s=120)
    run_distributed(_tp_features_worker, 2, ckpt, out, timeout_s=120)


def _generate_worker(rank, world_size, ckpt, data, out, train):
    from spd_megatron.draft.training.run import TimeBudgetReached, train_draft

    cfg = run_config(ckpt, data, out, 2, regenerate="greedy", regenerate_max_new_tokens=12, limit=12, **train)
    if train:
        with pytest.raises(TimeBudgetReached):  # every rank stops, none waits forever
            train_draft(cfg)
    else:
        train_draft(cfg)


@pytest.mark.distributed
def test_dp_ranks_share_the_self_distillation_and_stop_together(tiny_models, tmp_path):
    ckpt, run = tiny_models["llama"][1], tmp_path / "run"
    data = tmp_path / "data.jsonl"
    write_data(data)
    run_distributed(_generate_worker, 2, ckpt, str(data), str(run), {"time_budget_min": 1e-9}, timeout_s=240)
    assert (run / "self_distill_greedy.done").read_text() == "stopped\n"
    assert not (run / "self_distill_greedy.jsonl").exists()  # never a partial merged file
    run_distributed(_generate_worker, 2, ckpt, str(data), str(run), {}, timeout_s=240)
    shares = [len((run / f"self_distill_greedy.part{i}of2.jsonl").read_text().splitlines()) for i in range(2)]
    merged = (run / "self_distill_greedy.jsonl").read_text().splitlines()
    assert shares[0] >= shares[1] >= 4 and len(merged) == sum(shares)  # both ranks generated
    assert (run / "self_distill_greedy.done").read_text() == "complete\n"
    assert json.loads((run / "final" / "training.json").read_text())["steps"] == 2
    run_distributed(_generate_worker, 1, ckpt, str(data), str(tmp_path / "one"), {}, timeout_s=240)
    assert (tmp_path / "one" / "self_distill_greedy.jsonl").read_text().splitlines() == merged  # same order


def _uneven_worker(rank, world_size, ckpt, data, out):
    from spd_megatron.draft.training.run import train_draft

    cfg = run_config(ckpt, data, out, 1)
    cfg.parallel.layers_per_stage, cfg.draft.anchors = [3, 1], []  # the decode layout, not the teacher's
    train_draft(cfg)


@pytest.mark.distributed
def test_a_draft_trains_for_an_uneven_split(tiny_models, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(data)
    run_distributed(_uneven_worker, 1, tiny_models["llama"][1], str(data), str(tmp_path / "run"), timeout_s=240)
    config = json.loads((tmp_path / "run" / "final" / "pdm_config.json").read_text())
    assert config["split"] == [3, 1] and config["anchors"] == [0, 3, 4]


def _continue_worker(rank, world_size, ckpt, data, out):
    from spd_megatron.draft.training.run import train_draft

    first = train_draft(run_config(ckpt, data, out / "first", 2, draft_vocab_size=64))
    with pytest.raises(SPDError, match="train.pdm_layers=1") as err:
        train_draft(run_config(ckpt, data, out / "deeper", 1, init_from=str(first), pdm_layers=2))
    assert "\n" not in str(err.value)
    with pytest.raises(SPDError, match="not a folder"):
        train_draft(run_config(ckpt, data, out / "nowhere", 1, init_from=str(out / "missing")))
    train_draft(run_config(ckpt, data, out / "next", 1, init_from=str(first), lr=0.0, skip=3))


@pytest.mark.distributed
def test_a_run_continues_a_trained_draft(tiny_models, tmp_path):
    """train.init_from: the draft's weights and vocabulary (lr 0 keeps them), tokens counted on."""
    from safetensors.torch import load_file

    data = tmp_path / "data.jsonl"
    write_data(data)
    run_distributed(_continue_worker, 1, tiny_models["llama"][1], str(data), tmp_path, timeout_s=240)
    first, later = tmp_path / "first" / "final", tmp_path / "next" / "final"
    a, b = load_file(str(first / "pdm.safetensors")), load_file(str(later / "pdm.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    vocab = json.loads((first / "pdm_config.json").read_text())["draft_vocab"]
    assert 0 < len(vocab) <= 64 and json.loads((later / "pdm_config.json").read_text())["draft_vocab"] == vocab
    before, after = (json.loads((f / "training.json").read_text()) for f in (first, later))
    assert after["init_from"]["tokens_seen"] == before["tokens_seen"] > 0
    assert after["tokens_seen"] > before["tokens_seen"]
    assert after["conversations"]["train"] == before["conversations"]["train"] - 3  # train.skip=3
    assert f"Continued from `{tmp_path / 'first' / 'final'}`" in (later / "MODEL_CARD.md").read_text()
