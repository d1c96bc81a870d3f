"""Continued pretraining: exact block grouping, document reading with file:line errors, and short LoRA and
full-parameter runs on the tiny model that lower the loss and leave a loadable output folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_script
from medgpt.data.io import DataError, load_records
from medgpt.data.pretrain import PackStats, build_lm_dataset, encode_documents, pack_blocks, text_converter

DOCS = ["Fever is a temporary rise in body temperature.", "高血压是一种常见的慢性病。",
        "Wash hands with soap for twenty seconds.", "", "Insulin lowers blood glucose."] * 7


def _stream(tokenizer, docs):
    """The reference token stream: each document's ids followed by eos, concatenated."""
    out = []
    for d in docs:
        out += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("block_size", [7, 16, 50])
def test_blocks_are_exact_slices_of_the_token_stream(smol_tokenizer, block_size):
    stream = _stream(smol_tokenizer, DOCS)
    stats = PackStats()
    # a tiny tokenizer batch, so that blocks span batch edges
    blocks = [b for chunk in pack_blocks(encode_documents(DOCS, smol_tokenizer, batch_docs=3), block_size, stats)
              for b in chunk.tolist()]
    assert blocks and all(len(b) == block_size for b in blocks)
    flat = [t for b in blocks for t in b]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) == stats.dropped < block_size
    assert stats.tokens == len(stream) and stats.documents == len(DOCS)


def test_dataset_labels_equal_input_ids_and_limit_counts_blocks(smol_tokenizer):
    ds = build_lm_dataset(DOCS, smol_tokenizer, 16)
    stream = _stream(smol_tokenizer, DOCS)
    assert len(ds) == len(stream) // 16
    assert ds["input_ids"] == ds["labels"]
    assert [t for b in ds["input_ids"] for t in b] == stream[: 16 * len(ds)]
    assert len(build_lm_dataset(DOCS, smol_tokenizer, 16, limit=3)) == 3
    unpacked = build_lm_dataset(DOCS, smol_tokenizer, 5, packing=False)
    assert len(unpacked) == len(DOCS)  # one sample per document, cut at block_size
    assert unpacked[0]["input_ids"] == smol_tokenizer(DOCS[0])["input_ids"][:5]
    with pytest.raises(DataError, match="no sample of 4096 tokens"):
        build_lm_dataset(DOCS[:2], smol_tokenizer, 4096)


def test_txt_lines_and_keep_linebreaks(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufefffirst doc\r\n\n  \nsecond doc\nlast without newline".encode("utf-8"))
    keep = load_records([str(p)], text_converter(keep_linebreaks=True))
    assert [r["text"] for r in keep] == ["first doc\n", "second doc\n", "last without newline"]
    strip = load_records([str(p)], text_converter(keep_linebreaks=False))
    assert [r["text"] for r in strip] == ["first doc", "second doc", "last without newline"]
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"b\.txt:2: not UTF-8"):
        load_records([str(bad)], text_converter())


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"}\n{"text": broken\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "fine"}\n\n{"content": "no text"}\n', r"bad\.jsonl:3: missing field 'text'"),
    ('{"text": ["a list"]}\n', r"bad\.jsonl:1: field 'text' must be a string"),
    ('"just a string"\n', r"bad\.jsonl:1: a record must be a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_records([str(tmp_path / "bad.jsonl")], text_converter())


def test_script_reports_bad_record_in_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text("some text\n", encoding="utf-8")
    (data / "corpus.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    proc = run_script("pretraining.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data),
                      "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none", check=False)
    assert proc.returncode == 2
    assert f"error: {data / 'corpus.jsonl'}:2: missing field 'text'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, repetitive corpus (easy to learn) in all three formats."""
    d = tmp_path_factory.mktemp("pt-data")
    lines = [f"Patient {i % 5} has a fever and takes paracetamol twice a day." for i in range(40)]
    (d / "a.txt").write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[20:30]), encoding="utf-8")
    (d / "c.json").write_text(json.dumps([{"text": t} for t in lines[30:]]), encoding="utf-8")
    return str(d)


def _run(tiny_model_dir, corpus, out, *extra):
    return run_script(
        "pretraining.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", corpus,
        "--validation_split_percentage", "20", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--output_dir", str(out), "--report_to", "none", "--seed", "1",
        "--logging_steps", "1", "--save_strategy", "no", "--overwrite_output_dir", *extra)


def _eval_loss(out) -> float:
    return json.loads((Path(out) / "eval_results.json").read_text())["eval_loss"]


def test_lora_pretraining_lowers_eval_loss_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, corpus):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _run(tiny_model_dir, corpus, tmp_path / "before", "--do_eval")
    before = _eval_loss(tmp_path / "before")
    out = tmp_path / "lora"
    _run(tiny_model_dir, corpus, out, "--do_train", "--do_eval", "--max_steps", "15",
         "--learning_rate", "1e-2", "--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] < before - 0.4, (before, results)  # measured: 10.89 -> 10.01
    assert results["perplexity"] == pytest.approx(torch.exp(torch.tensor(results["eval_loss"])).item(), rel=1e-4)
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_full_parameter_pretraining_lowers_loss_and_saves_a_model(tmp_path, tiny_model_dir, corpus):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    _run(tiny_model_dir, corpus, out, "--do_train", "--max_steps", "10", "--learning_rate", "3e-3",
         "--use_peft", "False")
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 1.0, losses  # measured: 10.88 -> ~8.5
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_streaming_yields_the_same_blocks(tmp_path, smol_tokenizer, corpus):
    from transformers import TrainingArguments

    from medgpt.args import DataArguments, PretrainArguments, parse_args
    from medgpt.data.pretrain import build_pretrain_datasets

    def datasets(*extra):
        data_args, pt_args, training_args, _ = parse_args(
            DataArguments, PretrainArguments, TrainingArguments,
            argv=["--train_file_dir", corpus, "--block_size", "16", "--output_dir", str(tmp_path), "--do_train",
                  "--max_steps", "5", "--report_to", "none", *extra])
        return build_pretrain_datasets(data_args, pt_args, smol_tokenizer, training_args)

    packed, _ = datasets()
    streamed, _ = datasets("--streaming", "True")
    rows = list(streamed)
    assert [r["input_ids"] for r in rows] == packed["input_ids"] and all(r["labels"] == r["input_ids"] for r in rows)
    assert len(list(datasets("--streaming", "True", "--max_train_samples", "3")[0])) == 3
    with pytest.raises(SystemExit, match="needs --validation_file_dir"):
        datasets("--streaming", "True", "--do_eval")


def test_dataset_name_reads_a_text_column_plain_and_streamed(tmp_path, smol_tokenizer):
    from transformers import TrainingArguments

    from medgpt.args import DataArguments, PretrainArguments, parse_args
    from medgpt.data.pretrain import build_pretrain_datasets

    hub = tmp_path / "hub"  # a local folder stands in for a hub dataset name (load_dataset reads both)
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)
                                             if d), encoding="utf-8")

    def train_ids(*extra):
        data_args, pt_args, training_args, _ = parse_args(
            DataArguments, PretrainArguments, TrainingArguments,
            argv=["--dataset_name", str(hub), "--block_size", "8", "--output_dir", str(tmp_path / "o"), "--do_train",
                  "--max_steps", "1", "--report_to", "none", *extra])
        train, _ = build_pretrain_datasets(data_args, pt_args, smol_tokenizer, training_args, cache_dir=str(tmp_path / "c"))
        return [r["input_ids"] for r in train]

    stream = _stream(smol_tokenizer, [d for d in DOCS if d])
    expected = [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
    assert train_ids() == expected
    assert train_ids("--streaming", "True") == expected


def test_packed_blocks_keep_documents_apart(smol_tokenizer, tiny_model_dir):
    """Within a block each document is its own sample: position ids restart after every eos, the first token of
    each piece is not predicted from the previous document, and a document's logits equal its logits alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from medgpt.data.collator import DocumentFlatteningCollator, enable_packing

    eos = smol_tokenizer.eos_token_id
    docs = [smol_tokenizer(d)["input_ids"] + [eos] for d in DOCS[:3]]
    stream = sum(docs, [])
    cut = len(docs[0]) + len(docs[1]) + 2
    blocks = [stream[:cut], stream[cut:cut + 15]]  # the second block starts inside the third document
    batch = DocumentFlatteningCollator(eos)([{"input_ids": b, "labels": b} for b in blocks])
    ids, pos, labels = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids == stream[:cut + 15]
    starts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == eos] + [cut]
    assert sorted(set(starts)) == batch["cu_seq_lens_q"].tolist()[:-1]
    for s in set(starts):
        assert pos[s] == 0 and labels[s] == -100  # each piece starts afresh and is not a target
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert enable_packing(model) == "varlen_sdpa"
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        second = len(docs[0])
        alone = model(input_ids=torch.tensor([docs[1]])).logits[0]
    torch.testing.assert_close(packed[second:second + len(docs[1])], alone, atol=1e-5, rtol=1e-4)


def test_pretraining_logs_document_isolation(tmp_path, tiny_model_dir, corpus):
    proc = _run(tiny_model_dir, corpus, tmp_path / "out", "--do_train", "--max_steps", "2")
    assert "each document attends only to itself" in proc.stderr
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
