"""`longlive-triton serve`: a live prompt switch is LongLive's switch; the demo page in a real browser."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from longlive_triton.app.engine import embedded_engine
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import get_preset
from longlive_triton.app.serve import LiveSession

TINY = get_preset("tiny")


def test_a_live_switch_is_the_scheduled_switch():
    """next_prompt handing new embeddings at frame 6 gives the latents of a switch scheduled at frame 6."""
    engine = embedded_engine("stock", device="cpu")
    cat, dog = engine.encoder.encode(["a cat", "a dog"])
    noise = engine.noise(12, 3)
    torch.manual_seed(3)
    scheduled = BlockPipeline(engine.model).generate(noise, [cat, dog], [6])
    asked = []

    def next_prompt(start):
        asked.append(start)
        return dog if start == 6 else None

    torch.manual_seed(3)
    live = torch.cat([x0.clone() for _, x0 in BlockPipeline(engine.model).iter_blocks(noise, cat,
                                                                                      next_prompt=next_prompt)], 1)
    assert asked == [0, 3, 6, 9]
    assert torch.equal(live, scheduled)
    torch.manual_seed(3)
    unswitched = BlockPipeline(engine.model).generate(noise, cat)
    assert torch.equal(live[:, :6], unswitched[:, :6]) and not torch.equal(live[:, 6:], unswitched[:, 6:])

    bad = torch.cat([dog, dog])  # a batch of two for a one-video run: refused before the block runs
    with pytest.raises(ValueError, match=r"prompt embeddings must be \[B=1"):
        list(BlockPipeline(engine.model).iter_blocks(noise, cat, next_prompt=lambda s: bad if s == 3 else None))


def test_live_session_applies_a_requested_prompt_at_the_next_block():
    pytest.importorskip("PIL", reason="the demo's JPEG frames need pillow (pip install -e '.[app]')")
    session = LiveSession(embedded_engine("stock", device="cpu"), "a cat", frames=9, seed=0)
    session.start()
    try:
        first, jpegs = session.next_block()
        assert (first["block"], first["prompt"], first["switched"], first["frames"]) == (0, "a cat", False, 9)
        assert len(jpegs) == 9 and all(j[:2] == b"\xff\xd8" for j in jpegs)  # JPEG frames
        session.request_prompt("a dog")
        seen = [session.next_block()[0] for _ in range(4)]
    finally:
        session.stop()
    switched = [s for s in seen if s["switched"]]
    assert len(switched) == 1 and switched[0]["prompt"] == "a dog"
    assert switched[0]["block"] <= 1 + 2  # generated after the request: at most the blocks already queued
    assert seen[-1]["prompt"] == "a dog" and seen[-1]["video"] == 1  # a new video (9 frames each) keeps it


@pytest.mark.browser
def test_demo_in_the_browser(browser, tmp_path):
    exe = shutil.which("longlive-triton", path=os.path.dirname(sys.executable))
    assert exe is not None, "the longlive-triton console script is not installed (pip install -e .)"
    server = subprocess.Popen([exe, "serve", "--port", "0", "--preset", "stock", "--frames", "30", "--fps", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line, f"the server exited (code {server.poll()})"
            url = (re.search(r"serving on (http://\S+)", line) or [None, None])[1]
        browser.get(url)

        def wait_for(script: str, what: str, timeout: float = 60):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                value = browser.execute_script(script)
                if value:
                    return value
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {what}: {browser.execute_script('return window.llDemo')}")

        wait_for("return window.llDemo.frames >= 3", "the first frames")
        first = browser.execute_script("return document.getElementById('video').toDataURL()")
        wait_for(f"return document.getElementById('video').toDataURL() !== {first!r}", "the picture to change")
        assert browser.execute_script("return [document.getElementById('video').width, "
                                      "document.getElementById('video').height]") == [8 * TINY.latent_width,
                                                                                      8 * TINY.latent_height]
        ms = float(browser.find_element("id", "ms-per-frame").text)
        assert ms > 0 and "RANDOM WEIGHTS" in browser.find_element("id", "label").text

        before = browser.execute_script("return window.llDemo.frames")
        browser.find_element("id", "prompt-input").send_keys("a dog runs on a beach")
        browser.find_element("id", "switch-button").click()
        switch = wait_for("return window.llDemo.switches[0]", "the prompt switch")
        assert switch["prompt"] == "a dog runs on a beach"
        assert browser.find_element("id", "prompt-now").text == "a dog runs on a beach"
        assert "prompt switched at block" in browser.find_element("id", "log").text
        wait_for(f"return window.llDemo.frames > {before} + 12", "frames after the switch")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, "the server did not stop cleanly on Ctrl-C"
