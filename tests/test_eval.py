"""Evaluation: pass@k, majority vote, and one scoring for RL and evaluation (GRPO's reward and
metrics give the numbers the evaluation gives on the same completions)."""

import pytest
import torch

from infer_support import make_model
from nanoseek import tasks
from nanoseek.data.chat import R1_ZERO_TEMPLATE
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import consensus, evaluate, majority_vote, pass_at_k
from nanoseek.infer import Engine, SamplingParams
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, task_prompts, task_rewards


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((text for _, text in corpus(tasks.get("arith"), 300, seed=0)), vocab_size=320)


def test_pass_at_k():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_majority_vote():
    assert majority_vote(["12", " 7", "7", None, "", "12", "7 "]) == " 7"
    assert majority_vote([None, ""]) is None
    assert majority_vote(["1/2", "0.5", "2"], key=lambda a: {"1/2": "0.5"}.get(a, a)) == "1/2"


def test_consensus_votes_over_k_samples(tokenizer):
    engine = Engine(make_model(seed=2, vocab_size=tokenizer.vocab_size), tokenizer, max_batch_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    answers = [o.answer for o in engine.generate("3+4", SamplingParams(**{**vars(params), "n": 4}))[0].outputs]
    assert consensus(engine, ["3+4"], k=4, sampling_params=params) == [majority_vote(answers)]


# ---- the same completions through GRPO and through the evaluation ----------------------------
def scripted_engine(tokenizer, monkeypatch, scripts: dict) -> Engine:
    """A real engine whose sampler writes the given completions: `scripts[(prompt ids, sample
    index)]` is a completion's text, followed by end of sequence."""
    torch.manual_seed(0)
    engine = Engine(make_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch_size=16, max_seq_len=256)
    ids = {key: tokenizer.encode(text) + [tokenizer.special_ids["eos"]] for key, text in scripts.items()}

    def choose(seqs, logits):
        return [ids[(tuple(s.request.prompt_ids), s.index)][len(s.token_ids)] for s in seqs]

    monkeypatch.setattr(engine, "_choose", choose)
    return engine


def test_grpo_metrics_and_the_evaluation_agree(tokenizer, monkeypatch):
    task = tasks.get("arith")
    problems = task.sample(3, "test", seed=4)

    def samples(p):  # reasoning right, reasoning wrong, direct right, right but unformatted
        wrong = int(p.answer) + 1
        return [
            f" <think>{p.solution}</think> <answer>{p.answer}</answer>",
            f" <think>{p.solution}, so</think> <answer>{wrong}</answer>",
            f" <think></think> <answer>{p.answer}</answer>",
            f" <answer>{p.answer}</answer>",
        ]

    prompts = {p.prompt: tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=p.prompt), bos=True) for p in problems}
    scripts = {(tuple(prompts[p.prompt]), i): text for p in problems for i, text in enumerate(samples(p))}
    engine = scripted_engine(tokenizer, monkeypatch, scripts)

    samples = []
    result = evaluate(engine, task, problems, R1_ZERO_TEMPLATE, k=4, max_tokens=64, samples_out=samples)
    assert [s["completion"] for s in samples] == list(scripts.values())
    assert [s["correct"] for s in samples] == [True, False, True, True] * 3
    reward_fn, metrics_fn = task_rewards(task, {"accuracy": 1.0, "format": 0.1}, tokenizer, max_tokens=64)
    trainer = GRPOTrainer(
        engine.model,
        tokenizer,
        reward_fn,
        task_prompts(task, problems, R1_ZERO_TEMPLATE),
        GRPOConfig(group_size=4, prompts_per_step=3, max_new_tokens=64),
        metrics_fn=metrics_fn,
        engine=engine,
    )
    metrics = trainer.step()

    # The thinking length, counted independently: the token ids between <think> and </think>.
    think, end_think = tokenizer.special_ids["think"], tokenizer.special_ids["end_think"]
    lengths = []
    for text in scripts.values():
        ids = tokenizer.encode(text)
        lengths.append(ids.index(end_think) - ids.index(think) - 1 if think in ids else 0)
    assert sum(lengths) > 3 * 4  # the worked solutions are several tokens long
    assert result.thinking_len == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["thinking_len_mean"] == pytest.approx(result.thinking_len)
    assert metrics["thinking_len_max"] == max(lengths)
    assert result.pass_at_1 == metrics["accuracy"] == 0.75
    per_level: dict = {}  # the same numbers by difficulty
    for i, p in enumerate(problems):
        per_level.setdefault(p.difficulty, []).extend(lengths[4 * i : 4 * i + 4])
    assert sorted(result.by_difficulty) == sorted(per_level)
    for d, level in result.by_difficulty.items():
        assert level["problems"] == len(per_level[d]) // 4 and level["pass_at_1"] == 0.75
        assert level["thinking_len"] == pytest.approx(sum(per_level[d]) / len(per_level[d]))
    assert result.format_rate == metrics["format"] == 0.75
    assert result.thinking_share == 0.5 and result.thinking_accuracy == 0.5 and result.direct_accuracy == 1.0
    assert metrics["reward_mean"] == pytest.approx(0.75 + 0.1 * 0.75)


def test_grpo_accuracy_is_the_task_reward():
    """Countdown has its own reward: GRPO's accuracy term is it, not a generic answer match."""
    task = tasks.get("countdown")
    p = task.sample(1, "test", seed=0)[0]
    completions = [
        f" <think></think> <answer>{p.answer}</answer>",  # the task's own solution expression
        f" <think></think> <answer>{p.target}</answer>",  # the target: not made of the numbers
        " <think></think> <answer>1+</answer>",
    ]
    _, metrics_fn = task_rewards(task, {"accuracy": 1.0}, tokenizer=None, max_tokens=64)
    accuracy = metrics_fn(None, completions, problem=[p] * 3)["accuracy"]
    assert accuracy == [task.reward(c, p) for c in completions] == [1.0, 0.0, 0.0]


def test_evaluate_refuses_a_negative_temperature_before_sampling():
    with pytest.raises(NanoseekError, match=r"^SamplingParams.temperature = -1: expected a number >= 0$"):
        evaluate(None, tasks.get("arith"), [], R1_ZERO_TEMPLATE, temperature=-1)


def test_evaluate_measures_language_consistency_and_readability(tokenizer, monkeypatch):
    from nanoseek.data.chat import GENERATION_PROMPT
    from nanoseek.eval import task_language
    from nanoseek.tasks import Problem

    task = tasks.get("chain", signed=True, languages=["en", "el"], lookup=0.2)
    greek = Problem(prompt="α=3,β=-1. α+β", answer="2", difficulty=2, task="chain", meta={"language": "el"})
    lookup = Problem(prompt="a=3,b=-1,c=4. c", answer="4", difficulty=1, task="chain", meta={"reasoning": False})
    assert task_language(task, greek) == "el" and task_language(task, lookup) == "en"
    assert task_language(task, Problem(prompt=greek.prompt, answer="2")) == "el"  # read from the names
    assert task_language(tasks.get("arith"), Problem(prompt="1+2", answer="3")) == "en"
    samples = {
        greek: [
            " <think>α=3,b=-1. 3-1=2</think> α+β=2. <answer>2</answer>",  # switched: 1/2 Greek; a summary
            " <think>α=3,β=-1. 3-1=2</think> <answer>2</answer>",  # Greek, terse: no summary
        ],
        lookup: [
            " <think></think> <answer>4</answer>",  # asked without thinking: readable as it is
            " <think>c=4</think> <answer>4</answer>",  # thinks where none was asked
        ],
    }
    ids = {p.prompt: tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=p.prompt), bos=True) for p in samples}
    scripts = {(tuple(ids[p.prompt]), i): text for p, texts in samples.items() for i, text in enumerate(texts)}
    engine = scripted_engine(tokenizer, monkeypatch, scripts)
    result = evaluate(engine, task, list(samples), R1_ZERO_TEMPLATE, k=2, max_tokens=64)
    assert result.pass_at_1 == 1.0 and result.thinking_share == 0.75
    assert result.language_consistency == pytest.approx((0.5 + 1 + 1) / 3)  # over the 3 samples with reasoning
    assert result.readability == 0.5 and result.format_rate == 0.75
    assert result.as_dict()["language_consistency"] == result.language_consistency

    # no sample reasons: no consistency to measure; the chat template's answers need no <answer>
    chat = "User: {prompt}\n" + GENERATION_PROMPT
    latin = Problem(prompt="a=3,b=-1. a+b", answer="2", difficulty=2, task="chain", meta={"language": "en"})
    texts = ["\n</think>\n\n\\boxed{2}", "a=3,b=-1. 3-1=2\n</think>\n\na+b=2. \\boxed{2}"]
    chat_ids = tuple(tokenizer.encode(chat.format(prompt=latin.prompt), bos=True))
    engine = scripted_engine(tokenizer, monkeypatch, {(chat_ids, 0): texts[0], (chat_ids, 1): texts[1]})
    result = evaluate(engine, task, [latin], chat, k=2, max_tokens=64)
    assert result.format_rate == 1.0 and result.readability == 0.5 and result.language_consistency == 1.0
    engine = scripted_engine(tokenizer, monkeypatch, {(chat_ids, 0): texts[0]})
    result = evaluate(engine, task, [latin], chat, k=1, max_tokens=64)
    assert result.language_consistency is None and result.readability == 0.0 and result.thinking_share == 0.0


@pytest.mark.parametrize(
    "reasoning, expected",
    [
        ("a=3,b=5:3+5=7 wait, 3+5=8", True),
        ("Wait, let me re-evaluate this step", True),
        ("let me verify: 8-5=3", True),
        ("recheck the sum", True),
        ("a=3,b=5:3+5=8", False),
        ("await the result", False),
        ("waiting", False),
        ("", False),
    ],
)
def test_reflects_is_a_pinned_detector(reasoning, expected):
    from nanoseek.eval import reflects

    assert reflects(reasoning) is expected


def test_reflection_share_and_accuracy(tokenizer, monkeypatch):
    task = tasks.get("arith")
    problems = task.sample(2, "test", seed=5)

    def samples(p):  # reflects and right, reflects and wrong, plain right, plain wrong
        wrong = int(p.answer) + 1
        return [
            f" <think>{p.solution} wait, {p.solution}</think> <answer>{p.answer}</answer>",
            f" <think>{p.solution} wait, no</think> <answer>{wrong}</answer>",
            f" <think>{p.solution}</think> <answer>{p.answer}</answer>",
            f" <think>{p.solution}</think> <answer>{wrong}</answer>",
        ]

    prompts = {p.prompt: tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=p.prompt), bos=True) for p in problems}
    scripts = {(tuple(prompts[p.prompt]), i): text for p in problems for i, text in enumerate(samples(p))}
    result = evaluate(scripted_engine(tokenizer, monkeypatch, scripts), task, problems, R1_ZERO_TEMPLATE, k=4)
    assert result.pass_at_1 == 0.5
    assert result.reflection_share == 0.5 and result.reflection_accuracy == 0.5
    assert result.no_reflection_accuracy == 0.5
    for level in result.by_difficulty.values():
        assert level["reflection_share"] == level["reflection_accuracy"] == level["no_reflection_accuracy"] == 0.5


@pytest.mark.parametrize(
    "reasoning, expected",
    [
        ("a=3,b=-1:3-1=3 wait, 3-1=2,c=4. 2+4=6", True),  # the corpus's slip, as a model writes it
        ("a=3,b=-1:3-1=2,c=4. 2+4=7 Wait, let me check: 2+4=6", True),
        ("a=3,b=-1:3-1=2 wait, 3-1=2,c=4. 2+4=6", False),  # re-checks a right step: no slip
        ("a=3,b=-1:3-1=3 wait, 3-1=4,c=4. 4+4=8", False),  # the correction is wrong too
        ("a=3,b=-1:3-1=3 wait, c=4. 3+4=7", False),  # noticed, never corrected
        ("a=3,b=-1:3-1=3,c=4. 3+4=7", False),  # a slip, not noticed
        ("a=3,b=-2 wait, b=-1:3-1=2,c=4. 2+4=6", True),  # a value recalled wrong, re-read from the prompt
        ("a=3,b=-1:3-1=2,c=5 wait, c=4. 2+4=6", True),  # the last value, before the final step
        ("a=3,b=-1:3-1=2,c=5 wait, c=6. 2+6=8", False),  # re-read wrong again: not what the prompt binds
        ("a=3,b=-1:3-1=2,c=4 wait, c=4. 2+4=6", False),  # re-reads a right value: no slip
        ("a=3,b=-2 wait, c=4. 2+4=6", False),  # noticed, moved on to another name
        ("", False),
    ],
)
def test_corrects_a_slip(reasoning, expected):
    from nanoseek.eval import corrects_a_slip

    assert corrects_a_slip(reasoning, "a=3,b=-1,c=4. a+b+c") is expected
    without_prompt = corrects_a_slip(reasoning)
    assert without_prompt is (expected or reasoning.endswith("c=6. 2+6=8"))  # any other value counts then


def test_aha_samples_are_right_corrected_slips_hardest_first():
    from nanoseek.eval import aha_samples

    slip = "a=3,b=-1:3-1=3 wait, 3-1=2,c=4. 2+4=6"
    samples = [
        {"reasoning": slip, "correct": True, "difficulty": 3, "prompt": "p3"},
        {"reasoning": slip, "correct": False, "difficulty": 7, "prompt": "wrong"},
        {"reasoning": "a=3,b=-1:3-1=2,c=4. 2+4=6", "correct": True, "difficulty": 7, "prompt": "plain"},
        {"reasoning": slip, "correct": True, "difficulty": 5, "prompt": "p5"},
    ]
    assert [s["prompt"] for s in aha_samples(samples)] == ["p5", "p3"]
