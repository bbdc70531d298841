"""`longlive-bench e2e --model stock2` on the CPU (tiny2, Triton's interpreter): LongLive 2.0's class driven
by its own pipeline, unpatched and patched, with a scene cut, and the JSON record. Needs a LongLive 2.0
checkout (LONGLIVE_SRC2, or LONGLIVE_SRC) for the run; the argument checks do not."""
import json

import pytest

from longlive_triton.bench.cli import main


def test_stock2_bench(tmp_path, capsys):
    from .stock_harness2 import stock2_src
    src = stock2_src()
    if src is None:
        pytest.skip("no LongLive 2.0 checkout: set LONGLIVE_SRC2 (or LONGLIVE_SRC) to one, e.g. .stock/LongLive2")
    out = tmp_path / "run.json"
    rc = main(["e2e", "--model", "stock2", "--stock-src", src, "--configs", "exact", "--blocks", "3", "--cut-block",
               "2", "--warmup-blocks", "1", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "e2e-stock2" and record["settings"]["cut_block"] == 2
    stock, exact = record["rows"]
    assert stock["config"] == "stock" and exact["config"] == "exact" and len(exact["block_ms"]) == 3
    assert max(exact["drift_rel_l2"]) <= 1e-2 and "LongLive 2.0" in exact["report"]
    assert "LongLive 2.0 generator per block" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [(["--switch-every", "2"], "takes no"), (["--cut-block", "1"], "needs --model stock2")])
def test_stock2_bench_arguments(extra, message, capsys):
    model = ["--model", "stock2"] if "--switch-every" in extra else []
    assert main(["e2e", *model, *extra]) == 2
    assert message in capsys.readouterr().err
