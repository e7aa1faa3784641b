"""`nanoseek eval`: a model directory and `nanoseek serve` on it give the same results; the shipped
GSM8K and MATH samples are graded with math-verify; results files, --compare, and bad input as
one line with exit 2."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_pretrained, tasks
from nanoseek.cli import main
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.eval_cli import Completions, Reply, reply_text
from nanoseek.infer import Engine
from nanoseek.tasks.files import asset

from model_support import ENGINE_CONFIG
from serve_support import free_port, save_chat_model, serve_in_thread

ARITH = ["--task", "arith", "--limit", "3"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def results(directory) -> dict:
    return json.loads((directory / "results.json").read_text())


def same_numbers(a: dict, b: dict) -> None:
    """Every metric equal; the wall time is the only one that may differ."""
    a, b = dict(a["result"]), dict(b["result"])
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0
    assert a == b


# ---- the directory and the server on the same model ---------------------------------------
@pytest.fixture(scope="module")
def r1_zero_dir(tmp_path_factory):
    """A tiny random model with a tokenizer in the R1-Zero format, as the demo's models are."""
    directory = tmp_path_factory.mktemp("r1-zero")
    tokenizer = train_tokenizer((text for _, text in corpus(tasks.get("arith"), 300, seed=0)), vocab_size=320)
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig(**ENGINE_CONFIG)).eval(), directory)
    tokenizer.save_pretrained(directory, prompt_format="r1-zero")
    return directory


def script(monkeypatch, model_dir, completions) -> None:
    """Every engine writes `completions(problem)[i]` as sample i of a problem's prompt (the demo's
    shapes), for the prompt ids that the directory's template gives: a server that prompted
    otherwise would find no script."""
    from nanoseek.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    template = tokenizer.prompt_template()
    eos = tokenizer.special_ids["eos"]
    ids = {}
    for p in tasks.get("arith").sample(3, "test", seed=0):
        prompt = tuple(tokenizer.encode(template.format(prompt=p.prompt), bos=True))
        for i, text in enumerate(completions(p)):
            ids[(prompt, i)] = tokenizer.encode(text) + [eos]

    def choose(self, seqs, logits):
        return [ids[(tuple(s.request.prompt_ids), s.index)][len(s.token_ids)] for s in seqs]

    monkeypatch.setattr(Engine, "_choose", choose)


def demo_samples(p) -> list[str]:
    """Reasoning right, reasoning wrong, a direct answer (empty <think>), a summary before the answer."""
    return [
        f" <think>{p.solution}</think> <answer>{p.answer}</answer>",
        f" <think>{p.solution}, so</think> <answer>{int(p.answer) + 1}</answer>",
        f" <think></think> <answer>{p.answer}</answer>",
        f" <think>{p.solution}</think> so {p.answer}. <answer>{p.answer}</answer>",
    ]


def test_directory_and_server_agree_on_a_demo_shaped_model(r1_zero_dir, tmp_path, capsys, monkeypatch):
    script(monkeypatch, r1_zero_dir, demo_samples)
    sampling = ["-k", 4, "--max-tokens", 64, "--seed", 0]
    code, out, _ = run(capsys, "--model", r1_zero_dir, *ARITH, *sampling, "--out", tmp_path / "dir")
    assert code == 0 and "pass@1" in out
    engine = Engine.from_pretrained(r1_zero_dir, max_batch_size=16, max_seq_len=512)
    with serve_in_thread(engine) as url:
        code, out, _ = run(capsys, "--base-url", url, *ARITH, *sampling, "--out", tmp_path / "server")
    assert code == 0, out
    a, b = results(tmp_path / "dir"), results(tmp_path / "server")
    r = a["result"]
    assert (r["pass_at_1"], r["pass_at_k"], r["cons_at_k"]) == (0.75, 1.0, 1.0)
    assert (r["format_rate"], r["readability"], r["thinking_share"]) == (0.75, 0.25, 0.75)
    assert r["thinking_accuracy"] == pytest.approx(2 / 3) and r["direct_accuracy"] == 1.0
    assert r["tokens"] > 0 and r["thinking_len"] > 0
    same_numbers(a, b)
    assert b["base_url"] == url + "/v1" and b["served_model"] == "tiny" and a["model"] == str(r1_zero_dir)
    assert a["template"].endswith("User: {prompt}\nAssistant:") and b["template"] == "{prompt}"


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_directory_and_server_sample_the_same_completions(tmp_path, capsys, temperature):
    """Greedy and seeded sampling on a random chat model: the same samples, text for text."""
    model_dir = save_chat_model(tmp_path / "chat")
    argv = [*ARITH, "-k", 2, "--temperature", temperature, "--max-tokens", 12, "--seed", 3]
    assert run(capsys, "--model", model_dir, *argv, "--out", tmp_path / "dir")[0] == 0
    engine = Engine.from_pretrained(model_dir, max_batch_size=16, max_seq_len=512)
    with serve_in_thread(engine) as url:
        assert run(capsys, "--base-url", url, *argv, "--concurrency", 3, "--out", tmp_path / "server")[0] == 0
    a, b = results(tmp_path / "dir"), results(tmp_path / "server")
    same_numbers(a, b)
    assert a["result"]["tokens"] == 3 * 2 * 12  # the model never ends a completion: max tokens each

    def reasoning(d):  # the chat template opens <think>, so everything a sample says is its reasoning
        return [json.loads(line)["reasoning"] for line in (d / "samples.jsonl").read_text().splitlines()]

    assert reasoning(tmp_path / "dir") == reasoning(tmp_path / "server")
    texts = reasoning(tmp_path / "dir")
    assert all(texts) and (texts[0] == texts[1]) == (temperature == 0)


# ---- graded files, results files and --compare ---------------------------------------------
EQUIVALENT = {  # truth -> the same value written otherwise, which math-verify must accept
    "\\frac{11}{12}": "\\dfrac{11}{12}",
    "5\\sqrt{2}": "\\sqrt{50}",
    "(2,3)": "(2, 3)",
    "0.1": "\\frac{1}{10}",
}


class FakeEngine:
    """Answers each problem in a reply's shape: sample 0 right (an equivalent form where one is
    listed), the other samples wrong unless `right` says otherwise."""

    def __init__(self, answers: dict, right: int = 1):
        self.answers, self.right = answers, right

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            truth = self.answers[prompt]
            samples = []
            for i in range(params.n):
                answer = EQUIVALENT.get(truth, truth) if i < self.right else "-12345"
                text, reasoning, content = reply_text("Let me work it out.", f"So it is \\boxed{{{answer}}}.")
                samples.append(Reply(text, reasoning, content, num_tokens=10, reasoning_tokens=4))
            out.append(Completions(samples))
        return out


def fake_engine(monkeypatch, name: str, right: int = 1) -> None:
    task = tasks.get(name)
    answers = {p.prompt: p.answer for split in ("train", "test") for p in task.problems[split]}
    engine = FakeEngine(answers, right)
    monkeypatch.setattr("nanoseek.eval_cli.local_engine", lambda args, problems: (engine, "{prompt}", {"model": "m"}))


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_the_shipped_samples_are_graded_and_written(name, tmp_path, capsys, monkeypatch):
    fake_engine(monkeypatch, name)
    data = asset(f"{name}_sample.jsonl")
    code, out, _ = run(capsys, "--model", tmp_path, "--task", name, "--data", data, "-k", 2, "--out", tmp_path / "o")
    assert code == 0
    record = results(tmp_path / "o")
    r = record["result"]
    assert record["split"] == "all" and r["problems"] == 12  # a file given is evaluated whole
    assert (r["pass_at_1"], r["pass_at_k"], r["cons_at_k"]) == (0.5, 1.0, 1.0)  # the vote's tie: the first
    assert (r["tokens"], r["response_len"], r["thinking_len"], r["thinking_share"]) == (240, 10.0, 4.0, 1.0)
    assert record["task_options"] == {"path": str(data)} and record["sampling"]["k"] == 2
    assert {"task", "split", "model", "template", "sampling", "result"} <= set(record)
    assert {"pass_at_1", "pass_at_k", "cons_at_k", "format_rate", "by_difficulty", "tokens", "seconds"} <= set(r)
    samples = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and [s["correct"] for s in samples[:4]] == [True, False, True, False]
    keys = {"prompt", "answer", "completion", "reasoning", "correct", "tokens", "difficulty"}
    assert keys <= set(samples[0]) and samples[0]["tokens"] == 10
    md = (tmp_path / "o" / "results.md").read_text()
    assert f"# Evaluation: {name}" in md and "| pass@1 | 50.0% |" in md and "| pass@2 | 100.0% |" in md
    assert "pass@1" in out and "50.0%" in out


def test_split_and_limit_choose_the_problems(tmp_path, capsys, monkeypatch):
    fake_engine(monkeypatch, "gsm8k")
    for extra, problems in ([[], 1], [["--split", "train"], 11], [["--split", "all", "--limit", 5], 5]):
        assert run(capsys, "--model", tmp_path, "--task", "gsm8k", "-k", 1, *extra, "--out", tmp_path)[0] == 0
        assert results(tmp_path)["result"]["problems"] == problems


def test_compare_prints_two_results_side_by_side(tmp_path, capsys, monkeypatch):
    for right, out in ((1, "a"), (2, "b")):
        fake_engine(monkeypatch, "gsm8k", right)
        assert run(capsys, "--model", tmp_path, "--task", "gsm8k", "-k", 2, "--out", tmp_path / out)[0] == 0
    code, out, _ = run(capsys, "--compare", tmp_path / "a" / "results.json", tmp_path / "b" / "results.json")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  pass@")}
    assert rows["pass@1"] == ["50.0%", "100.0%", "+50.0", "pts"]
    assert rows["pass@2"] == ["100.0%", "100.0%", "+0.0", "pts"]
    assert "A: " in out and "B: " in out and "metric" in out


# ---- an endpoint that fails, then answers ----------------------------------------------------
class FlakyAPI(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions; the first `failures` chat requests get those statuses."""

    failures: list = []
    chats = 0

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": "flaky", "object": "model", "created": 0, "owned_by": "x"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).chats += 1
        if self.failures:
            status = self.failures.pop(0)
            self.reply(status, {"error": {"message": f"status {status} from the test", "type": "x"}})
            return
        choice = {"message": {"role": "assistant", "content": "\\boxed{33}", "reasoning_content": "r"}}
        self.reply(
            200,
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": i, "finish_reason": "stop", **choice} for i in range(body["n"])],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": 7 * body["n"],
                    "total_tokens": 5 + 7 * body["n"],
                    "completion_tokens_details": {"reasoning_tokens": 3 * body["n"]},
                },
            },
        )


@pytest.fixture
def flaky_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyAPI.chats = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    thread.join()


def test_an_endpoint_is_retried_after_503_and_429(flaky_api, capsys):
    FlakyAPI.failures = [503, 429]
    argv = ["--task", "gsm8k", "--split", "test", "-k", 2, "--retries", 2, "--concurrency", 1]
    code, out, err = run(capsys, "--base-url", flaky_api, *argv)
    assert code == 0, err
    assert FlakyAPI.chats == 3  # one problem: two failures, then the reply
    assert "flaky" in out and "14" in out  # the served model by name; 2 x 7 completion tokens


@pytest.mark.parametrize(
    ("failures", "retries", "message"),
    [([400], 2, "HTTP 400: status 400 from the test"), ([500, 500], 1, "HTTP 500: status 500 from the test")],
)
def test_a_failing_endpoint_is_one_line(flaky_api, capsys, failures, retries, message):
    FlakyAPI.failures = list(failures)
    code, out, err = run(capsys, "--base-url", flaky_api, "--task", "gsm8k", "--split", "test", "--retries", retries)
    assert code == 2 and err == f"error: {flaky_api}: {message}\n"
    assert FlakyAPI.chats == len(failures)  # a 400 is not retried; a 500 is, up to --retries


def test_reply_text_reads_the_reasoning_where_the_server_left_it():
    assert reply_text("r", "\\boxed{2}") == ("<think>r</think> <answer>\\boxed{2}</answer>", "r", "\\boxed{2}")
    assert reply_text(None, "r\n</think>\n\n2") == ("<think>r</think> <answer>2</answer>", "r", "2")
    assert reply_text(None, "<think>r</think> <answer>2</answer>")[1:] == ("r", "2")
    assert reply_text("cut off", "") == ("<think>cut off", "cut off", "")  # never closed: stays open


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "arith"], "give one of --model DIR or --base-url URL"),
        (["--model", "m", "--base-url", "http://x", "--task", "arith"], "give one of --model DIR or --base-url URL"),
        (["--model", "{tmp}/none", "--task", "arith"], "--model {tmp}/none: no such directory"),
        (["--model", "{tmp}", "--task", "gsm8k", "--data", "{tmp}/no.jsonl"], "{tmp}/no.jsonl: no such file"),
        (["--model", "{tmp}", "--task", "nope"], "task 'nope': expected one of arith, chain, countdown, gsm8k, math"),
        (["--model", "{tmp}", "--task", "arith", "--data", "x.jsonl"], "--data: only gsm8k and math read files"),
        (["--model", "{tmp}", "--task", "arith", "-o", "max_ops"], "-o max_ops: expected key=value"),
        (["--model", "{tmp}", "--task", "arith", "--split", "all"], "--split all: only for gsm8k and math files"),
        (["--model", "{tmp}", "--task", "arith", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--base-url", "http://x", "--task", "arith", "--template", "r1-zero"], "--template r1-zero: an endpoint"),
        (["--compare", "{tmp}/a.json", "{tmp}/b.json"], "{tmp}/a.json: no such file"),
        (["--base-url", "http://127.0.0.1:{port}", "--task", "arith", "--retries", "1"], "(after 1 retries)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    port = free_port()  # nothing listens on it
    fill = {"tmp": tmp_path, "port": port}
    code, out, err = run(capsys, *(a.format(**fill) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err
