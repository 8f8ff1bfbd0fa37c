"""Parsers on captured real outputs of llama-perplexity and llama-quantize (both streams), and
on the older formats listed in SPEC.md."""

from pathlib import Path

import pytest

from hypothesis import given, settings, strategies as st

from orchestrator.parse import ParseError, PerplexityProgress, parse_perplexity, parse_quantize, quantize_progress

OUT = Path(__file__).parent / "data" / "outputs"


def both(stem):
    return (OUT / f"{stem}-stdout.txt").read_text() + (OUT / f"{stem}-stderr.txt").read_text()


def test_perplexity_current_format_with_timestamped_log():
    r = parse_perplexity(both("perplexity"))
    assert (r["ppl"], r["ppl_err"]) == (48.7955, 8.32389)
    assert r["chunks"] == [13.9665, 39.6862, 48.0579, 65.5733, 54.7977, 48.7955]
    assert "kld" not in r


def test_perplexity_stream_order_does_not_matter():
    a = (OUT / "perplexity-stdout.txt").read_text()
    b = (OUT / "perplexity-stderr.txt").read_text()
    assert parse_perplexity(b + a) == parse_perplexity(a + b)


def test_perplexity_older_format():
    text = "perplexity: calculating perplexity over 655 chunks, batch_size=512\n" \
           "[1]4.5970,[2]5.1807,[3]6.0382,\nFinal estimate: PPL = 5.7985 +/- 0.03237\n"
    r = parse_perplexity(text)
    assert (r["ppl"], r["ppl_err"], r["chunks"]) == (5.7985, 0.03237, [4.5970, 5.1807, 6.0382])


def test_kl_divergence_format():
    r = parse_perplexity(both("kld"))
    assert (r["ppl"], r["ppl_err"]) == (42.841888, 5.341503)
    assert (r["kld"], r["kld_err"]) == (0.327284, 0.013344)
    assert (r["same_top"], r["same_top_err"]) == (66.667, 1.880)
    assert (r["rms_dp"], r["rms_dp_err"]) == (12.916, 0.921)
    assert len(r["chunks"]) == 10 and r["chunks"][0] == 13.8724 and r["chunks"][-1] == 42.8419


def test_reference_kld_summary_lines():
    text = ("====== Perplexity statistics ======\nMean PPL(Q)                   :   5.798500 ±   0.032400\n"
            "====== KL divergence statistics ======\nMean    KLD:   0.000369 ±   0.000002\n"
            "====== Token probability statistics ======\nSame top p: 98.846 ± 0.028 %\n")
    r = parse_perplexity(text)
    assert (r["ppl"], r["kld"], r["same_top"]) == (5.7985, 0.000369, 98.846)


@pytest.mark.parametrize("text", [
    "",
    "[1]4.5970,[2]5.1807,\n",  # cut short: chunks but no final estimate
    "perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512\n",
])
def test_missing_final_estimate_is_an_error_never_zero(text):
    with pytest.raises(ParseError, match="no final estimate"):
        parse_perplexity(text)


def test_non_finite_estimate_is_an_error():
    with pytest.raises(ParseError, match="not finite"):
        parse_perplexity("Final estimate: PPL = nan +/- nan\n")


def test_quantize_current_format():
    r = parse_quantize(both("quantize-q8_0"))
    assert (r["model_mib"], r["model_bpw"], r["quant_mib"], r["quant_bpw"]) == (256.63, 16.00, 136.40, 8.51)
    assert len(r["tensor_types"]) == 272
    assert r["tensor_types"]["blk.29.ffn_up.weight"] == "q8_0"
    assert r["tensor_types"]["output_norm.weight"] == "f32"  # copied, not converted


def test_quantize_older_format_without_bpw():
    text = ("[  12/ 291]                blk.0.attn_q.weight - [ 4096,  4096,     1,     1], type =    f16, "
            "converting to q4_0 .. size =    32.00 MiB ->     9.00 MiB\n"
            "llama_model_quantize_internal: model size  = 12853.02 MiB\n"
            "llama_model_quantize_internal: quant size  =  3647.87 MiB\n")
    r = parse_quantize(text)
    assert (r["model_mib"], r["quant_mib"]) == (12853.02, 3647.87) and "quant_bpw" not in r
    assert r["tensor_types"] == {"blk.0.attn_q.weight": "q4_0"}
    assert quantize_progress(text.splitlines()[0]) == (12, 291)


def test_quantize_that_did_not_finish_is_an_error():
    with pytest.raises(ParseError):
        parse_quantize("[   1/ 272] output_norm.weight - [576, 1, 1, 1], type = f32, size = 0.002 MiB\n")


@settings(max_examples=200, deadline=None)
@given(stem=st.sampled_from(["perplexity", "kld"]), cuts=st.lists(st.floats(0, 1), max_size=40))
def test_chunk_progress_whatever_the_pieces_output_comes_in(stem, cuts):
    # a running llama-perplexity's output read as it comes: pieces end anywhere, inside a number too
    text = both(stem)
    at = sorted({round(c * len(text)) for c in cuts} | {0, len(text)})
    progress, reports = PerplexityProgress(), []
    for a, b in zip(at, at[1:]):
        if progress.feed(text[a:b]):
            reports.append(progress.done)
    total = len(parse_perplexity(text)["chunks"])
    assert progress.total == total
    assert reports == sorted(set(reports)) and reports[-1] == total  # only forward, to the end


def test_time_left_counts_passes_not_chunks():
    # llama-perplexity scores n_seq chunks in one pass, then prints them one after another
    p = PerplexityProgress()
    p.feed("perplexity: calculating perplexity over 20 chunks, n_ctx=512, batch_size=2048, n_seq=4\n[1]5.1,")
    assert (p.done, p.total, p.seconds_left(100)) == (1, 20, 400)  # 1 pass of 5 in 100 s, not 1 chunk of 20
    p.feed("[2]5.2,[3]5.3,[4]5.4,")
    assert p.seconds_left(100) == 400
    p.feed("[5]5.5,")
    assert p.seconds_left(200) == 300
    older = PerplexityProgress()  # no n_seq said: a chunk a pass
    older.feed("perplexity: calculating perplexity over 655 chunks, batch_size=512\n[1]4.5970,")
    assert older.seconds_left(10) == 6540
