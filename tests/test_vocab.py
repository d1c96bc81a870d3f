"""Domain vocabulary expansion: tools/build_domain_tokenizer.py + tools/merge_tokenizers.py on SmolLM2's real
byte-level tokenizer and on a Llama-style SentencePiece tokenizer built here; embedding rows from their sub-tokens'
mean; PT with the expanded vocabulary, merge_peft_adapter.py --resize_emb and inference.py."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, build_tiny_model, run_script

# held-out medical text: not in data/pretrain (the domain corpus)
HELD_OUT_ZH = ("高血压患者需要长期规律服药，定期在家监测血压，并注意低盐饮食。糖尿病患者应控制血糖，"
               "预防视网膜和肾脏的并发症。")
HELD_OUT_EN = ("Patients with hypertension and hypercholesterolemia often take statins; metformin and insulin "
               "treat hyperglycemia, and atrial fibrillation needs an anticoagulant.")
TRICKY = " two  spaces,\ttabs\n\nnew lines 12345 高血压 x"
WORDS = ROOT / "data" / "vocab" / "medical_terms.txt"


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """The domain SentencePiece model and jieba word list of data/pretrain, through the CLI."""
    out = tmp_path_factory.mktemp("domain")
    proc = run_script("tools/build_domain_tokenizer.py", "--in_file", str(ROOT / "data" / "pretrain"),
                      "--domain_sp_model_name", str(out / "domain_sp"), "--vocab_size", "3000",
                      "--word_freq_file", str(out / "word_freq.txt"), "--jieba_user_dict", str(WORDS))
    assert "pieces" in proc.stdout
    return out


@pytest.fixture(scope="module")
def smol_merged(domain, default_model_dir, tmp_path_factory):
    """tools/merge_tokenizers.py's work in this process (the script itself: test_pipeline_expand_vocab, and the
    error tests below)."""
    from medgpt.vocab import merge_tokenizers, read_word_list

    out = tmp_path_factory.mktemp("smol-merged")
    words = read_word_list(str(WORDS)) + read_word_list(str(domain / "word_freq.txt"))
    merge_tokenizers(default_model_dir, str(out), str(domain / "domain_sp.model"), words)
    return str(out)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A Llama-style tokenizer: a byte-fallback BPE SentencePiece model (identity normalization, whitespace kept, as
    Llama's) trained on general text, converted by transformers' LlamaTokenizer; tokenizer.model kept beside it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp_dir, out = tmp_path_factory.mktemp("llama-sp"), tmp_path_factory.mktemp("llama-base")
    shared = ROOT.parent / "shared" / "data" / "pretrain"
    if (shared / "tianlongbabu.txt").is_file():
        text = (shared / "en_article_tail500.txt").read_text()[:20000] + (shared / "tianlongbabu.txt").read_text()[:20000]
    else:  # general sentences of our own
        text = "\n".join(["The weather was cold and the river ran fast under the old stone bridge.",
                          "他们在山上走了一天，傍晚才回到村子里吃饭。", "Numbers like 2024 and 17 are split digit by digit."] * 50)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(sp_dir / "tokenizer"), vocab_size=2000,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    LlamaTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(out))
    shutil.copy(sp_dir / "tokenizer.model", out / "tokenizer.model")
    return str(out)


@pytest.fixture(scope="module")
def llama_merged(domain, llama_base, tmp_path_factory):
    from medgpt.vocab import merge_tokenizers, read_word_list

    out = tmp_path_factory.mktemp("llama-merged")
    merge_tokenizers(llama_base, str(out), str(domain / "domain_sp.model"), read_word_list(str(WORDS)))
    return str(out)


def _assert_extends(base, merged, info):
    """Every original token keeps its id and string; the new ones follow."""
    base_vocab, merged_vocab = base.get_vocab(), merged.get_vocab()
    assert all(merged_vocab[t] == i for t, i in base_vocab.items())
    ids = list(range(len(base)))
    assert merged.convert_ids_to_tokens(ids) == base.convert_ids_to_tokens(ids)
    assert [merged.decode([i]) for i in ids[::7]] == [base.decode([i]) for i in ids[::7]]
    assert merged.all_special_tokens == base.all_special_tokens and merged.all_special_ids == base.all_special_ids
    assert len(merged) == len(base) + len(info["new_tokens"]) > len(base) + 500
    assert sorted(t["id"] for t in info["new_tokens"]) == list(range(len(base), len(merged)))
    for t in info["new_tokens"][::50]:
        assert merged.convert_ids_to_tokens(t["id"]) == t["token"]
        # the sub-tokens spell the new token (a Llama decoder drops the text's first space)
        text = t["text"][1:] if info["alphabet"] == "metaspace" and t["text"].startswith(" ") else t["text"]
        assert base.decode(t["base_ids"]) == text


def _assert_shorter_and_exact(base, merged, text, at_most=0.8):
    b, m = base.encode(text, add_special_tokens=False), merged.encode(text, add_special_tokens=False)
    assert len(m) <= at_most * len(b), (len(b), len(m), merged.convert_ids_to_tokens(m))
    assert merged.decode(m) == text
    return len(b), len(m)


def test_smollm2_byte_level_merge(smol_tokenizer, smol_merged):
    from transformers import AutoTokenizer

    merged = AutoTokenizer.from_pretrained(smol_merged)
    info = json.load(open(os.path.join(smol_merged, "medgpt_vocab.json")))
    assert info["alphabet"] == "byte_level" and info["added"]["words"] > 0
    _assert_extends(smol_tokenizer, merged, info)
    zh = _assert_shorter_and_exact(smol_tokenizer, merged, HELD_OUT_ZH, 0.5)
    en = _assert_shorter_and_exact(smol_tokenizer, merged, HELD_OUT_EN)
    print("SmolLM2 tokens, base -> merged: zh %d -> %d, en %d -> %d" % (*zh, *en))
    assert merged.decode(merged.encode(TRICKY)) == TRICKY
    assert merged.tokenize(" hypercholesterolemia") == ["Ġhypercholesterolemia"]  # from the word list, after a space
    assert "é«ĺè¡Ģåİĭ" in merged.get_vocab()  # 高血压
    # new tokens are BPE entries, not added tokens: a space before them survives, special tokens are unchanged
    assert len(merged.get_added_vocab()) == len(smol_tokenizer.get_added_vocab())
    assert info["added"]["not_one_token"] <= 0.01 * len(info["new_tokens"])
    chat = [{"role": "user", "content": HELD_OUT_ZH}]
    assert merged.apply_chat_template(chat, tokenize=False) == smol_tokenizer.apply_chat_template(chat, tokenize=False)


def test_llama_sentencepiece_merge(llama_base, llama_merged):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base, merged = AutoTokenizer.from_pretrained(llama_base), AutoTokenizer.from_pretrained(llama_merged)
    info = json.load(open(os.path.join(llama_merged, "medgpt_vocab.json")))
    assert info["alphabet"] == "metaspace"
    _assert_extends(base, merged, info)
    _assert_shorter_and_exact(base, merged, HELD_OUT_ZH, 0.6)
    _assert_shorter_and_exact(base, merged, HELD_OUT_EN, 0.5)
    assert merged.decode(merged.encode(TRICKY[1:], add_special_tokens=False)) == TRICKY[1:]
    # a leading space is dropped by Llama's decoder, as by the base tokenizer
    assert merged.decode(merged.encode(TRICKY)) == base.decode(base.encode(TRICKY))
    assert merged.encode("hi there") == base.encode("hi there")  # same special tokens added
    # tokenizer.model (MedicalGPT's way: pieces appended to the proto) gives the new pieces the same ids
    sp_base = spm.SentencePieceProcessor(model_file=os.path.join(llama_base, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_merged, "tokenizer.model"))
    assert len(sp) == len(merged)
    assert all(sp.piece_to_id(t["token"]) == t["id"] for t in info["new_tokens"])
    assert all(sp.id_to_piece(i) == sp_base.id_to_piece(i) for i in range(len(sp_base)))
    for text in (HELD_OUT_ZH, HELD_OUT_EN):
        assert sp.decode(sp.encode(text)) == text
        assert len(sp.encode(text)) < 0.8 * len(sp_base.encode(text))


def test_word_lists_and_bad_inputs(domain, tmp_path, default_model_dir):
    from medgpt.data.io import DataError
    from medgpt.vocab import read_word_list

    freqs = dict(line.split() for line in (domain / "word_freq.txt").read_text().splitlines())
    assert int(freqs["糖尿病"]) >= 2 and all(int(n) >= 2 for n in freqs.values())
    assert "糖化血红蛋白" in freqs or "糖化" not in freqs  # the user dictionary keeps the term whole
    words = tmp_path / "words.txt"
    words.write_text("# comment\nrare 1\n\ncommon 90 n\nplain\n", encoding="utf-8")
    assert read_word_list(str(words)) == ["common", "rare", "plain"]
    assert read_word_list(str(words), max_words=1) == ["common"]
    words.write_text("good 3\nbad x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"words.txt:2: frequency 'x' is not a whole number"):
        read_word_list(str(words))
    proc = run_script("tools/merge_tokenizers.py", "--base_tokenizer_dir", default_model_dir, "--add_words_file",
                      str(words), "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {words}:2: frequency 'x' is not a whole number"
    bad_sp = tmp_path / "x.model"
    bad_sp.write_bytes(b"not a model")
    proc = run_script("tools/merge_tokenizers.py", "--domain_sp_model_file", str(bad_sp), "--output_dir",
                      str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad_sp}: not a SentencePiece model")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("tools/build_domain_tokenizer.py", "--in_file", str(empty), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {empty}: no .txt/.json/.jsonl files")
    (empty / "c.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    proc = run_script("tools/build_domain_tokenizer.py", "--in_file", str(empty), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {empty / 'c.jsonl'}:2: missing field 'text'"


def test_new_embedding_rows_are_sub_token_means(llama_base, llama_merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.modeling import resize_embeddings

    base_tok, merged = AutoTokenizer.from_pretrained(llama_base), AutoTokenizer.from_pretrained(llama_merged)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", base_tok, tie_word_embeddings=False))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings(model, merged) == len(merged) - len(base_tok)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(merged)
    assert torch.equal(emb[:len(base_tok)], old_in) and torch.equal(head[:len(base_tok)], old_out)
    info = json.load(open(os.path.join(llama_merged, "medgpt_vocab.json")))
    for t in info["new_tokens"]:
        ids = t["base_ids"]
        assert torch.allclose(emb[t["id"]], old_in[ids].mean(0)) and torch.allclose(head[t["id"]], old_out[ids].mean(0))
    # the record is the base tokenizer's own segmentation, e.g. "▁hypertension" -> the base ids of "hypertension" (the
    # tokenizer prepends ▁), CJK characters the base lacks -> their bytes (byte fallback)
    starts = [t for t in info["new_tokens"] if t["token"].startswith("▁") and "▁" not in t["token"][1:]]
    assert len(starts) > 100 and any(len(t["text"]) > 1 and "\u4e00" <= t["text"][1] <= "\u9fff" for t in starts)
    for t in starts:
        assert t["base_ids"] == base_tok.encode(t["text"][1:], add_special_tokens=False), t
    assert resize_embeddings(model, merged) == 0  # already that size: nothing re-initialised


@pytest.mark.slow  # four script runs: ~40 s on an idle 2-core CPU
def test_pt_with_expanded_vocab_merge_and_inference(llama_base, llama_merged, tmp_path):
    """PT trains the new rows through --modules_to_save and lowers the loss; the adapter merges with --resize_emb and
    the merged model answers in inference.py exactly as base + adapter + merged tokenizer does."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(llama_base)
    tiny = build_tiny_model(tmp_path / "tiny", base_tok, initializer_range=0.2)
    out = tmp_path / "pt"
    run_script("pretraining.py", "--model_name_or_path", tiny, "--tokenizer_name_or_path", llama_merged,
               "--train_file_dir", str(ROOT / "data" / "pretrain"), "--output_dir", str(out), "--do_train",
               "--block_size", "64", "--per_device_train_batch_size", "4", "--max_steps", "16",
               "--learning_rate", "1e-2", "--modules_to_save", "embed_tokens,lm_head", "--logging_steps", "1",
               "--save_strategy", "no", "--report_to", "none", "--seed", "1")
    losses = [h["loss"] for h in json.load(open(out / "trainer_state.json"))["log_history"] if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4, losses
    assert (out / "medgpt_vocab.json").is_file() and len(AutoTokenizer.from_pretrained(out)) == len(
        AutoTokenizer.from_pretrained(llama_merged))
    merged = tmp_path / "merged"
    run_script("merge_peft_adapter.py", "--lora_model", str(out), "--base_model", tiny, "--output_dir", str(merged),
               "--resize_emb")
    config = json.load(open(merged / "config.json"))
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(merged)) > len(base_tok)
    # the tiny model has no chat template: it continues the text (trained on the corpus, it does not stop at once)
    ask = ["--prompt", "高血压患者应该", "--max_new_tokens", "8", "--temperature", "0"]
    a = run_script("inference.py", "--base_model", str(merged), *ask).stdout.strip()
    b = run_script("inference.py", "--base_model", tiny, "--lora_model", str(out), "--tokenizer_path",
                   llama_merged, *ask).stdout.strip()
    print("merged model:", a)
    assert a and a == b


@pytest.mark.slow  # the pipeline's PT and SFT stages, merges and answers: a few minutes
def test_pipeline_expand_vocab(learnable_model_dir, tmp_path):
    """run_pipeline.py --expand_vocab: the merged tokenizer is built from data/pretrain, PT trains embed_tokens and
    lm_head with it, and SFT starts from the merged PT model with its tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path / "pipe"
    short = "--max_steps 2 --eval_steps 1 --logging_steps 1 --report_to none"
    proc = run_script("run_pipeline.py", "--model_name_or_path", learnable_model_dir, "--output_root", str(root),
                      "--expand_vocab", "--stages", "pt,sft", "--max_new_tokens", "4", "--stage_args", f"pt={short}",
                      "--stage_args", f"sft={short}", timeout=1500)
    merged = AutoTokenizer.from_pretrained(root / "vocab" / "merged_tokenizer")
    assert len(merged) > len(AutoTokenizer.from_pretrained(learnable_model_dir)) + 500
    adapter = json.load(open(root / "pt" / "adapter_config.json"))
    assert set(adapter["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    for stage in ("pt-merged", "sft-merged"):
        assert json.load(open(root / stage / "config.json"))["vocab_size"] == len(merged), stage
        assert len(AutoTokenizer.from_pretrained(root / stage)) == len(merged), stage
    assert "Assistant (SFT model):" in proc.stdout


def test_qwen_layout_special_tokens_keep_their_ids(domain, default_model_dir, tmp_path):
    """Qwen keeps its special tokens out of the BPE vocabulary, after it; tokenizers numbers such added tokens from
    the vocabulary's size when it loads, so the merge must not shift them."""
    from transformers import AutoTokenizer

    from medgpt.vocab import merge_tokenizers, read_word_list

    t = json.load(open(os.path.join(default_model_dir, "tokenizer.json")))
    specials = [a["content"] for a in t["added_tokens"]]
    ordered = [k for k, _ in sorted(t["model"]["vocab"].items(), key=lambda kv: kv[1]) if k not in specials]
    t["model"]["vocab"] = {k: i for i, k in enumerate(ordered)}
    for j, a in enumerate(t["added_tokens"]):
        a["id"] = len(ordered) + j
    base_dir = tmp_path / "qwen-like"
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(base_dir)
    json.dump(t, open(base_dir / "tokenizer.json", "w"), ensure_ascii=False)
    config = json.load(open(base_dir / "tokenizer_config.json"))
    config.pop("added_tokens_decoder", None)
    json.dump(config, open(base_dir / "tokenizer_config.json", "w"))
    base = AutoTokenizer.from_pretrained(base_dir)
    assert base.convert_tokens_to_ids("<|im_start|>") == len(ordered) + 1
    info = merge_tokenizers(str(base_dir), str(tmp_path / "merged"), str(domain / "domain_sp.model"),
                            read_word_list(str(WORDS)))
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    _assert_extends(base, merged, info)
    text = "<|im_start|>user\n" + HELD_OUT_ZH + "<|im_end|>"
    assert merged.decode(merged.encode(text)) == text and merged.encode(text)[0] == base.encode(text)[0]
    _assert_shorter_and_exact(base, merged, HELD_OUT_ZH, 0.5)
