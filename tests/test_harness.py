"""lm-evaluation-harness on local data: gsm8k_fedpeft agrees with the federation's exact match."""

import json

import pytest
import torch

from fedpeft import adapters, cli, harness, models
from fedpeft.causal import evaluation
from fedpeft.causal.answers import final_number
from fedpeft.causal.encoding import encode_pair
from fedpeft.causal.generation import greedy_generate
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.run_folder import RunFolder

pytest.importorskip("lm_eval")
CPU = torch.device("cpu")
TOKENS = 8


def _lora_model(seed: int = 0, scale: float = 0.05):
    spec = models.ModelSpec.from_config({"name": "tiny_llama"}, 0)
    model = adapters.inject(
        models.load_model(spec, seed=0), adapters.AdapterSpec("lora", 4, 8.0, ("q_proj", "v_proj"))
    )
    adapters.write_adapter(model, adapters.initial_adapter(model, 0))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for layer in adapters.lora_layers(model).values():
            weight = adapters.factor_weight(layer, "lora_B")
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    return model.eval(), models.load_tokenizer(spec)


@pytest.fixture(scope="module")
def questions(data_dir):
    rows = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:16]
    return [json.loads(r)["question"] for r in rows]


def test_gsm8k_fedpeft_agrees_with_the_federations_exact_match(tmp_path, questions):
    """Same problems, same greedy settings: the same texts and the same exact match.

    The gold answers are set so that some problems are right: the number the model itself says
    on half of those where it says one, a different number elsewhere.
    """
    model, tokenizer = _lora_model()
    prompts = [encode_pair(tokenizer, q, "#### 0", 512) for q in questions]
    said = greedy_generate(
        model,
        tokenizer,
        [p["input_ids"][: p["prompt_length"]] for p in prompts],
        max_new_tokens=TOKENS,
        batch_size=4,
        device=CPU,
    )
    numbers = [final_number(t) for t in said]
    spoken = [i for i, n in enumerate(numbers) if n is not None]
    assert len(spoken) >= 2, f"too few generations hold a number: {said}"
    right = set(spoken[: len(spoken) // 2 + 1])
    answers = [
        f"so it is {numbers[i]}\n#### {numbers[i]}" if i in right else f"#### {1000 + i}"
        for i in range(len(questions))
    ]
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    examples = [encode_pair(tokenizer, q, a, 512) for q, a in zip(questions, answers, strict=True)]
    ours = evaluation.evaluate(
        model, tokenizer, examples, batch_size=4, device=CPU, max_new_tokens=TOKENS
    )
    result = harness.evaluate_model(
        model,
        tokenizer,
        [harness.FEDPEFT_GSM8K],
        data_dir=tmp_path,
        batch_size=3,
        max_new_tokens=TOKENS,
    )
    theirs = result["results"][harness.FEDPEFT_GSM8K]["exact_match,final-number"]
    assert ours["exact_match"] == pytest.approx(len(right) / len(questions))
    assert theirs == pytest.approx(ours["exact_match"])
    samples = sorted(result["samples"][harness.FEDPEFT_GSM8K], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == said
    assert [s["doc"]["question"] for s in samples] == questions


def _run_folder(tmp_path, task_overrides=()):
    """A causal run folder as `fedpeft simulate` leaves it: config.yaml and a peft adapter."""
    cfg = compose_config(["model=tiny_llama", "dataset=gsm8k", "partition=iid", *task_overrides])
    folder = RunFolder(tmp_path / "run", cfg)
    model, _ = _lora_model(seed=3)
    model.save_pretrained(str(folder.adapter_dir))
    return folder.path, model


def test_evaluate_writes_lm_evals_gsm8k_result_beside_the_run(tmp_path, capsys):
    run, model = _run_folder(tmp_path)
    loaded, tokenizer, _ = harness.load_run_model(run, "cpu")
    ids = torch.tensor([tokenizer("Tom has 3 apples.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    code = cli.main(
        ["evaluate", str(run), "tasks=gsm8k", "limit=2", "num_fewshot=1", "max_new_tokens=4"]
    )
    assert code == 0
    result = json.loads((run / harness.RESULTS_FILE).read_text())
    assert result["n-shot"]["gsm8k"] == 1
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(
        result["results"]["gsm8k"]
    )
    samples = json.loads((run / harness.SAMPLES_FILE).read_text())["gsm8k"]
    assert {s["doc_id"] for s in samples} == {0, 1}  # one record per filter (strict, flexible)
    assert samples[0]["doc"]["question"].startswith("Janet")
    assert "strict-match" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tasks=gsm8k", "data_dir={empty}"], r"tasks=gsm8k: its data is not local"),
        (["tasks=gsm8k", "shots=3"], r"'shots=3' is not key=value with a known key"),
        (["limit=3"], r"needs tasks=<lm-eval tasks>"),
        (["tasks=gsm8k", "limit=0"], r"limit=0 must be an integer >= 1"),
    ],
)
def test_bad_evaluate_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    run, _ = _run_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    assert cli.main(["evaluate", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_not_a_run_folder_and_an_unknown_task(tmp_path):
    with pytest.raises(ConfigError, match="is not a finished run folder"):
        harness.load_run_model(tmp_path)
    with pytest.raises(ConfigError, match="tasks=no_such_task is not an lm-eval task"):
        harness.task_configs(
            ["no_such_task"], tmp_path, tmp_path, num_fewshot=None, max_new_tokens=None
        )


def test_a_4bit_run_loads_for_lm_eval_and_data_needs_a_folder(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    run, _ = _run_folder(tmp_path, ["model.quantization=4bit"])
    model, _, _ = harness.load_run_model(run, "cpu")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"
    monkeypatch.delenv("FEDPEFT_DATA_DIR")
    with pytest.raises(ConfigError, match=r"pass data_dir=<folder> or set FEDPEFT_DATA_DIR"):
        harness.evaluate_run(run, ["tasks=gsm8k"])
