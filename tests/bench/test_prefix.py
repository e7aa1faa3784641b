"""`nanoseek bench prefix`: both engines give the same replies, the cached prompt tokens are the
conversation's whole blocks before each turn, the table prints, and bad sizes are one line."""

from nanoseek.bench.prefix import bench_prefix
from nanoseek.cli import main


def test_bench_prefix_reuses_the_conversation_and_prints_the_table(capsys):
    bench = bench_prefix("tiny", turns=3, user_tokens=20, reply_tokens=6, repeats=2, log=lambda _: None)
    assert bench.same_tokens
    assert bench.prompt_tokens == [20, 46, 72]
    # before turn k: the turns and replies so far, but the last reply's last token (never fed), in blocks of 16
    assert bench.cached_tokens == [0, (46 - 20 - 1) // 16 * 16, (72 - 20 - 1) // 16 * 16] == [0, 16, 48]
    assert len(bench.cached_ttft) == len(bench.plain_ttft) == 3 and min(bench.cached_ttft + bench.plain_ttft) > 0
    assert main(["bench", "prefix", "--preset", "tiny", "--turns", "2", "--user-tokens", "18", "--reply-tokens", "4",
                 "--repeats", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "prefix cache: time to first token, tiny" in out and "same replies with and without the cache: yes" in out
    assert main(["bench", "prefix", "--preset", "tiny", "--turns", "9", "--user-tokens", "300"]) == 2
    assert "a conversation of 3276 tokens exceeds max_position_embeddings 1024" in capsys.readouterr().err
    assert main(["bench", "prefix", "--preset", "tiny", "--turns", "0"]) == 2
