"""medgpt.evaluation and evaluate_model.py: every benchmark layout loads (bad records name file and line), the
log-likelihood scorer equals a hand computation and picks its argmax, a tiny model trained on the answers scores
higher than before, ROUGE-L/BLEU see Chinese characters, the CLI writes JSON and Markdown, and the report section."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_model, run_script
from medgpt.data.io import DataError
from medgpt.evaluation import (EvalConfig, FewShot, accuracy_by_subject, evaluate, load_conversations, load_mcq,
                               split_few_shot, text_metrics, wilson_interval)
from medgpt.evaluation.mcq import MCQ, load_mcq_file, subject_and_split
from medgpt.evaluation.scoring import build_messages, option_answer, parse_choice, score_loglikelihood


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path, records) -> str:
    return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------------------------------------------
# Layouts

def test_cmb_layout_drops_empty_options_and_skips_multiple_answers(tmp_path):
    f = _jsonl(tmp_path / "cmb" / "CMB-Exam_val.json", [
        {"exam_type": "医师考试", "exam_subject": "内科", "question": "胰岛素由哪个器官分泌？",
         "question_type": "单项选择题", "option": {"A": "肝", "B": "胰腺", "C": "肾", "D": "脾", "E": ""}, "answer": "B"},
        {"exam_subject": "外科", "question": "多选题", "option": {"A": "1", "B": "2", "C": "3"}, "answer": "AC"},
    ])
    skipped = {}
    [q] = load_mcq_file(f, skipped=skipped)
    assert (q.question, q.letters, q.options, q.answer_letter, q.subject, q.split) == (
        "胰岛素由哪个器官分泌？", ["A", "B", "C", "D"], ["肝", "胰腺", "肾", "脾"], "B", "内科", "val")
    assert q.where == f"{f}:1"
    assert skipped == {"multiple answers": [f"{f}:2"]}


def test_ceval_and_cmmlu_csv_layouts(tmp_path):
    # C-Eval: id,question,A,B,C,D,answer,explanation; <subject>_dev.csv / <subject>_val.csv
    dev = _write(tmp_path / "ceval" / "clinical_medicine_dev.csv",
                 'id,question,A,B,C,D,answer,explanation\n0,"多行\n题干",甲,乙,丙,丁,C,解析\n')
    val = _write(tmp_path / "ceval" / "clinical_medicine_val.csv",
                 "id,question,A,B,C,D,answer\n0,题一,甲,乙,丙,丁,A\n1,题二,甲,乙,丙,丁,d\n")
    # CMMLU: an unnamed index column, capitalised Question/Answer; test/<subject>.csv
    cmmlu = _write(tmp_path / "cmmlu" / "test" / "anatomy.csv", ",Question,A,B,C,D,Answer\n0,Q,a,b,c,d,B\n")
    items = load_mcq([str(tmp_path / "ceval")])
    assert [(q.subject, q.split, q.answer_letter, q.where) for q in items] == [
        ("clinical_medicine", "dev", "C", f"{dev}:2"), ("clinical_medicine", "val", "A", f"{val}:2"),
        ("clinical_medicine", "val", "D", f"{val}:3")]
    assert items[0].question == "多行\n题干"
    scored, pool = split_few_shot(items)
    assert [q.split for q in scored] == ["val", "val"] and [q.split for q in pool] == ["dev"]
    # a dev split whose subjects no other file has (MedMCQA's dev.json next to MedQA) is scored, not used as examples
    other = MCQ("Q", ["A", "B"], ["a", "b"], 0, "Anatomy", "medmcqa/dev.json:1", "dev")
    scored, pool = split_few_shot(items + [other])
    assert other in scored and other not in pool and len(pool) == 1
    [q] = load_mcq([cmmlu])
    assert (q.subject, q.split, q.options, q.answer_letter) == ("anatomy", "test", ["a", "b", "c", "d"], "B")


def test_medqa_layout_reads_answer_idx_not_the_answer_text(tmp_path):
    f = _jsonl(tmp_path / "US" / "test.jsonl", [
        {"question": "A 23-year-old woman ...", "answer": "Nitrofurantoin", "meta_info": "step2&3",
         "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"}, "answer_idx": "D"}])
    [q] = load_mcq([f])
    assert (q.answer_letter, q.options[q.answer], q.subject, q.split) == ("D", "Nitrofurantoin", "US", "test")


@pytest.mark.parametrize("cops, base_letters", [([1, 4, 2], "ADB"), ([0, 3, 1], "ADB")])
def test_medmcqa_layout_detects_1_to_4_and_0_to_3_numbering(tmp_path, cops, base_letters):
    f = _jsonl(tmp_path / "medmcqa" / "dev.json", [
        {"id": str(i), "question": f"Q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop,
         "choice_type": "single", "subject_name": "Anatomy"} for i, cop in enumerate(cops)])
    items = load_mcq([f])
    assert "".join(q.answer_letter for q in items) == base_letters
    assert {q.subject for q in items} == {"Anatomy"}
    if cops[0] == 1:  # an explicit numbering overrides the detection: 4 is out of range for 0-3
        with pytest.raises(DataError, match=r"dev.json:2: field 'cop' is 4 but there are 4 options \(read as 0-3\)"):
            load_mcq([f], cop_base=0)


def test_medmcqa_test_split_without_answers_is_skipped_and_counted(tmp_path):
    f = _jsonl(tmp_path / "m" / "test.json", [
        {"question": "Q1", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1},
        {"question": "Q2", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}])
    skipped = {}
    items = load_mcq([f], skipped=skipped)
    assert [q.answer_letter for q in items] == ["B"] and skipped == {"no answer key": [f"{f}:1"]}


def test_generic_layout_list_or_dict_options_letter_or_text_answer(tmp_path):
    f = _write(tmp_path / "mixed.json", json.dumps([
        {"question": "Q1", "options": ["x", "y", "z"], "answer": "c"},
        {"question": "Q2", "options": {"B": "second", "A": "first"}, "answer": "(B)"},
        {"question": "Q3", "options": ["red", "green"], "answer": "green", "subject": "colours"},
    ], indent=1))
    items = load_mcq([f])
    assert [(q.letters, q.answer_letter) for q in items] == [(["A", "B", "C"], "C"), (["A", "B"], "B"), (["A", "B"], "B")]
    assert items[1].options == ["first", "second"]
    assert [q.subject for q in items] == ["mixed", "mixed", "colours"]
    starts = [str(n) for n, line in enumerate(open(f, encoding="utf-8"), 1) if line == " {\n"]
    assert len(starts) == 3 and [q.where.rsplit(":", 1)[1] for q in items] == starts  # where each element starts


def test_subject_and_split_from_names():
    assert subject_and_split("/d/anatomy_val.csv") == ("anatomy", "val")
    assert subject_and_split("/d/dev/anatomy.csv") == ("anatomy", "dev")
    assert subject_and_split("/d/MedQA/test.jsonl") == ("MedQA", "test")
    assert subject_and_split("/d/medical_mcq_en.jsonl") == ("medical_mcq_en", None)


@pytest.mark.parametrize("name, content, message", [
    ("g.jsonl", '{"question": "Q", "options": ["a", "b"], "answer": "A"}\n{"question": "Q", "options": ["a", "b"], '
                '"answer": "F"}\n', "g.jsonl:2: field 'answer' 'F' is not one of the options A, B"),
    ("g.jsonl", '{"question": "Q", "options": ["a"], "answer": "A"}\n', "g.jsonl:1: needs at least 2 non-empty options"),
    ("g.jsonl", '{"question": "", "options": ["a", "b"], "answer": "A"}\n', "g.jsonl:1: field 'question' is empty"),
    ("g.jsonl", '{"question": "Q", "options": ["a", "b"]}\n', "g.jsonl:1: missing field 'answer'"),
    ("g.jsonl", '{"question": "Q", "options": "a b", "answer": "A"}\n', "g.jsonl:1: field 'options' must be a list"),
    ("g.jsonl", '{"question": "Q", "options": ["a", "b"], "answer": 1}\n', "g.jsonl:1: field 'answer' must be an option letter"),
    ("g.jsonl", '{"question": "Q", "options": ["a", "b"], "answer": "A"}\n{"question": \n',
     "g.jsonl:2: invalid JSON"),
    ("c.jsonl", '{"question": "Q", "option": {"A": "a", "7": "b"}, "answer": "A"}\n',
     "c.jsonl:1: field 'option' has the key '7'; option keys must be letters"),
    ("q.jsonl", '{"question": "Q", "options": {"A": "a", "B": "b"}, "answer_idx": "E", "answer": "x"}\n',
     "q.jsonl:1: field 'answer_idx' 'E' is not one of the options A, B"),
    ("m.jsonl", '{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 9}\n',
     "m.jsonl:1: field 'cop' must be the correct option's number"),
    ("m.jsonl", '{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}\n'
                '{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}\n',
     "m.jsonl: MedMCQA 'cop' values include both 0 and 4"),
    ("s.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "s.jsonl:1: an SFT conversation, not a multiple"),
    ("x.jsonl", '{"prompt": "Q"}\n', "x.jsonl:1: not a multiple-choice record (keys: prompt)"),
    ("v.csv", "id,question,A,B,C,D,answer\n0,Q,a,b,c,d,A\n1,Q,a,b,c,d,Z\n",
     "v.csv:3: field 'answer' 'Z' is not one of the options A, B, C, D"),
    ("v.csv", "id,question,A,B,C,D,answer\n0,Q,a,b,c\n", "v.csv:2: 5 fields, but the header has 7"),
    ("v.csv", "id,question,A,B,C,D\n0,Q,a,b,c,d\n", "v.csv:1: no 'answer' column"),
    ("v.csv", "id,text,opt1,opt2\n", "v.csv:1: CSV header needs the columns question, A, B"),
    ("n.jsonl", '{"question": "Q", "options": ["a", "b"], "answer": ""}\n', "n.jsonl: no question with an answer key"),
])
def test_bad_records_name_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_mcq([path])
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]))
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_sample_data_loads():
    items = load_mcq(["data/eval/medical_mcq_en.jsonl", "data/eval/medical_mcq_zh.jsonl"])
    assert len(items) == 40 and {q.subject for q in items} == {"medical_mcq_en", "medical_mcq_zh"}
    assert all(len(q.options) >= 4 for q in items)
    convs = load_conversations(["data/eval/medical_conversations_heldout.jsonl"])
    assert len(convs) == 8 and all(c["messages"][-1]["role"] == "user" and c["reference"] for c in convs)


# ---------------------------------------------------------------------------------------------------
# Prompts, few-shot, statistics

def _q(subject, n, answer=0, split=None):
    return MCQ(f"Question {n}?", ["A", "B", "C"], [f"opt{n}a", f"opt{n}b", f"opt{n}c"], answer, subject, f"f:{n}", split)


def test_few_shot_uses_dev_pool_else_other_questions_of_the_subject():
    a1, a2, a3, b1 = _q("a", 1), _q("a", 2, 1), _q("a", 3), _q("b", 4)
    shots = FewShot(2, [a1, a2, a3, b1])
    assert shots(a1) == [a2, a3] and shots(a2) == [a1, a3] and shots(b1) == []
    dev = _q("a", 9, split="dev")
    assert FewShot(2, [a1, a2, b1], [dev])(a1) == [dev]
    assert FewShot(0, [a1, a2])(a1) == []
    msgs = build_messages(a1, [a2])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"].startswith("The following is a multiple-choice question.")
    assert msgs[0]["content"].endswith("Question 2?\nA. opt2a\nB. opt2b\nC. opt2c")
    assert msgs[1]["content"] == "B. opt2b" and msgs[2]["content"] == "Question 1?\nA. opt1a\nB. opt1b\nC. opt1c"
    zh = MCQ("哪个器官分泌胰岛素？", ["A", "B"], ["肝", "胰腺"], 1, "s", "f:1")
    assert build_messages(zh)[0]["content"].startswith("以下是单项选择题")


def test_wilson_interval_and_accuracy_by_subject():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775  # not empty at 0%, unlike the normal approximation
    acc = accuracy_by_subject([{"subject": "a", "correct": True}, {"subject": "a", "correct": False},
                               {"subject": "b", "correct": True}])
    assert acc["subjects"]["a"]["accuracy"] == 0.5 and acc["subjects"]["b"]["accuracy"] == 1.0
    assert acc["overall"]["n"] == 3 and math.isclose(acc["overall"]["accuracy"], 2 / 3)
    assert acc["macro_accuracy"] == 0.75


def test_parse_choice():
    q = MCQ("Q", ["A", "B", "C", "D"], ["Liver", "Pancreas", "Kidney", "Spleen"], 1, "s", "f:1")
    assert parse_choice("B. Pancreas", q) == 1
    assert parse_choice("The answer is (C)", q) == 2
    assert parse_choice("答案：D", q) == 3
    assert parse_choice("It is the pancreas... Pancreas", q) == 1
    assert parse_choice("I am not sure", q) is None  # "I" is not one of the letters


def test_text_metrics_score_chinese_by_character():
    m = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert round(m["rougeL"], 6) == 100.0 and round(m["bleu"], 4) == 100.0
    m = text_metrics(["高血压患者要少吃盐"], ["高血压患者应当少吃盐"])
    # 8 of the 9 and 10 characters in order: F1 = 2 * 8/9 * 8/10 / (8/9 + 8/10)
    assert math.isclose(m["rougeL"], 100 * 2 * (8 / 9) * (8 / 10) / (8 / 9 + 8 / 10), rel_tol=1e-6)
    assert text_metrics(["完全不同"], ["毫无关系"])["rougeL"] == 0.0


# ---------------------------------------------------------------------------------------------------
# Scoring with a model

@pytest.fixture(scope="module")
def chat(learnable_model_dir):
    from medgpt.generation import ChatModel

    torch.manual_seed(0)
    return ChatModel(learnable_model_dir, template_name="chatml", device="cpu")


QUESTIONS = [MCQ(q, ["A", "B", "C", "D"], opts, ans, "s", f"f:{i}") for i, (q, opts, ans) in enumerate([
    ("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Spleen"], 1),
    ("Which vitamin prevents scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"], 2),
    ("Which cells carry oxygen?", ["Red blood cells", "White blood cells", "Platelets", "Plasma cells"], 0),
    ("Which vessels carry blood away from the heart?", ["Veins", "Capillaries", "Lymph vessels", "Arteries"], 3),
    ("缺乏维生素D容易患哪种疾病？", ["坏血病", "佝偻病", "夜盲症", "口角炎"], 1),
    ("How many chambers does the heart have?", ["Two", "Three", "Four", "Five"], 2),
])]


def _hand_logprob(chat, prompt: str, answer: str) -> tuple[float, int]:
    """Sum of log p(answer token | everything before it), one unpadded forward of prompt + answer."""
    tok = chat.tokenizer
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    with torch.no_grad():
        logp = torch.log_softmax(chat.model(torch.tensor([full])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, full[t]]) for t in range(len(p_ids), len(full))), len(full) - len(p_ids)


@pytest.mark.parametrize("ll_norm", ["none", "tokens"])
def test_loglikelihood_scores_equal_a_hand_computation_and_pick_the_best(chat, ll_norm):
    shots = FewShot(1, QUESTIONS)
    results = score_loglikelihood(chat, QUESTIONS, shots, batch_size=4, ll_norm=ll_norm)  # 2 batches, mixed lengths
    for item, r in zip(QUESTIONS, results):
        prompt = chat.build_prompt(build_messages(item, shots(item)))
        hand = {}
        for i, letter in enumerate(item.letters):
            lp, n = _hand_logprob(chat, prompt, option_answer(item, i))
            hand[letter] = lp / n if ll_norm == "tokens" else lp
            assert r["tokens"][letter] == n
            assert math.isclose(r["scores"][letter], hand[letter], abs_tol=2e-3), (letter, r["scores"], hand)
        assert r["prediction"] == max(hand, key=hand.get)
        assert r["correct"] == (r["prediction"] == item.answer_letter)


def test_training_on_the_answers_raises_accuracy(learnable_model_dir):
    from medgpt.data.preference import split_tokenize
    from medgpt.generation import ChatModel

    torch.manual_seed(0)
    chat = ChatModel(learnable_model_dir, template_name="chatml", device="cpu")
    shots = FewShot(0, QUESTIONS)
    before = accuracy_by_subject(score_loglikelihood(chat, QUESTIONS, shots))["overall"]["accuracy"]
    # a few steps of next-token training on each question's correct answer only (one padded batch)
    seqs, labels = [], []
    for item in QUESTIONS:
        prompt = chat.build_prompt(build_messages(item))
        p_ids, a_ids = split_tokenize(chat.tokenizer, prompt, option_answer(item, item.answer))
        seqs.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width, pad = max(map(len, seqs)), chat.tokenizer.pad_token_id
    batch = {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
             "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
             "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}
    model = chat.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = accuracy_by_subject(score_loglikelihood(chat, QUESTIONS, shots))["overall"]["accuracy"]
    assert before < 0.7 and after == 1.0, (before, after)


def test_evaluate_generation_with_a_reward_model(chat, tmp_path, smol_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from medgpt.generation import GenerationOptions
    from medgpt.reward import RewardScorer

    rm_dir = tmp_path / "rm"
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                      pad_token_id=smol_tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    smol_tokenizer.save_pretrained(rm_dir)
    scorer = RewardScorer(str(rm_dir), template_name="chatml", device="cpu")
    convs = load_conversations(["data/eval/medical_conversations_heldout.jsonl"], max_samples=3)
    cfg = EvalConfig(batch_size=2, generation=GenerationOptions(max_new_tokens=6, temperature=0))
    res = evaluate(chat, QUESTIONS[:2], convs, cfg, reward_scorer=scorer)
    g = res["generation"]
    assert g["n"] == 3 and len(g["samples"]) == 3
    preds = [s["prediction"] for s in g["samples"]]
    assert math.isclose(g["rougeL"], text_metrics(preds, [c["reference"] for c in convs])["rougeL"])
    expected = scorer.score_messages([c["messages"] for c in convs], preds)
    assert math.isclose(g["reward_mean"], float(expected.mean()), rel_tol=1e-5)
    assert res["mcq"]["overall"]["n"] == 2


# ---------------------------------------------------------------------------------------------------
# CLI and report

def test_cli_writes_json_and_markdown(tiny_model_dir, tmp_path):
    ceval = tmp_path / "ceval"
    _write(ceval / "physician_dev.csv", "id,question,A,B,C,D,answer\n0,示例题,甲,乙,丙,丁,B\n1,示例二,甲,乙,丙,丁,A\n")
    _write(ceval / "physician_val.csv", "id,question,A,B,C,D,answer\n0,题一,甲,乙,丙,丁,A\n1,题二,甲,乙,丙,丁,C\n"
                                        "2,题三,甲,乙,丙,丁,D\n")
    out = tmp_path / "out"
    proc = run_script("evaluate_model.py", "--base_model", tiny_model_dir, "--template_name", "chatml",
                      "--eval_file", str(ceval), "data/eval/medical_mcq_en.jsonl", "--max_samples", "3",
                      "--num_few_shot", "1", "--generated_letter", "--batch_size", "2",
                      "--sft_eval_file", "data/eval/medical_conversations_heldout.jsonl", "--max_new_tokens", "4",
                      "--output_dir", str(out), "--use_cpu", timeout=300)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(results["mcq"]["subjects"]) == {"physician", "medical_mcq_en"}
    assert results["mcq"]["subjects"]["physician"]["n"] == 3  # the dev file gave the examples, it is not scored
    assert results["mcq"]["subjects"]["medical_mcq_en"]["n"] == 3
    assert results["mcq"]["overall"]["n"] == 6 and len(results["mcq"]["items"]) == 6
    assert results["mcq_generated"]["overall"]["n"] == 6
    assert results["generation"]["n"] == 3 and "reward_mean" not in results["generation"]
    assert results["config"]["num_few_shot"] == 1 and results["template"] == "chatml"
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| subject | questions | accuracy (%) | 95% CI (Wilson) |" in md
    assert "| physician | 3 |" in md and "| **overall** | 6 |" in md
    assert "## Held-out conversations" in md and "| ROUGE-L | BLEU |" in md
    assert "# Evaluation results" in proc.stdout


def test_cli_bad_input_is_one_line_error(tiny_model_dir, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"question": "Q", "options": ["a", "b"], "answer": "C"}\n')
    proc = run_script("evaluate_model.py", "--base_model", tiny_model_dir, "--eval_file", bad,
                      "--output_dir", str(tmp_path / "o"), check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:1: field 'answer' 'C' is not one of the options A, B"
    proc = run_script("evaluate_model.py", "--base_model", tiny_model_dir, check=False, timeout=120)
    assert proc.returncode == 2 and "nothing to evaluate" in proc.stderr


def test_report_evaluation_section(chat, tmp_path):
    from medgpt.generation import GenerationOptions
    from medgpt.report import write_report

    cfg = EvalConfig(batch_size=4, generation=GenerationOptions(max_new_tokens=3, temperature=0))
    convs = load_conversations(["data/eval/medical_conversations_heldout.jsonl"], max_samples=2)
    en = [q for q in QUESTIONS if q.question.isascii()]
    zh = [MCQ(q.question, q.letters, q.options, q.answer, "zh", q.where) for q in QUESTIONS if not q.question.isascii()]
    res = evaluate(chat, en + zh, convs, cfg)
    path = write_report(str(tmp_path / "report" / "report.md"), [], [], {},
                        evaluation={"Base": res, "SFT": res}, evaluation_notes=["A note."])
    text = open(path, encoding="utf-8").read()
    assert "## Evaluation: medical multiple choice and held-out conversations" in text
    assert "| model | MCQ s | MCQ zh | MCQ overall | ROUGE-L | BLEU |" in text
    assert text.count("\n| Base | ") == 1 and text.count("\n| SFT | ") == 1
    assert "A note." in text and "![evaluation](evaluation.png)" in text
    assert (tmp_path / "report" / "evaluation.png").stat().st_size > 1000
