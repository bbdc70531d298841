"""`longlive-triton serve`: a live LongLive stream in the browser, with the prompt switched from a text box.

    longlive-triton serve --port 8000            # the embedded random-weights model; open http://127.0.0.1:8000

A generator thread streams blocks through `iter_video` forever (a new video, with the next seed,
after `--frames` latent frames) and encodes each decoded frame as a JPEG. The page gets them over
a WebSocket (`/ws`): a JSON status message per block (block, prompt, generator + VAE ms per video
frame), then the block's frames, played at `--fps`. A prompt typed in the page is POSTed to
`/prompt`; the generator takes it before its next block and applies it as a LongLive prompt switch
(`BlockPipeline`'s re-cache of the KV window under the new prompt, `next_prompt`). The generator
runs at most two blocks ahead of what is shown, so a switch shows within about two blocks.
"""
from __future__ import annotations

import asyncio
import io
import json
import queue
import sys
import threading
import time
from importlib import resources

import torch

from longlive_triton.app.engine import FRAMES_PER_BLOCK, Engine
from longlive_triton.app.generate import DEFAULT_PROMPT, VIDEO_FPS, UsageError, add_model_arguments, build_engine, choose_device
from longlive_triton.app.mp4 import to_uint8
from longlive_triton.runtime.video import iter_video

__all__ = ["add_arguments", "run", "LiveSession", "make_app"]

_AHEAD_BLOCKS = 2      # decoded blocks waiting to be shown: how far the generator may run ahead
_MAX_PROMPT = 2000     # characters


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to start with")
    p.add_argument("--frames", type=int, default=240, help="latent frames per video before a new one starts "
                   "(default 240, LongLive's interactive length)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first video (default 0)")
    p.add_argument("--fps", type=float, default=VIDEO_FPS, help=f"playback frames per second (default {VIDEO_FPS})")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of the streamed frames (default 85)")
    add_model_arguments(p)


class LiveSession:
    """Generates video forever in a thread; `request_prompt` switches the prompt at the next block."""

    def __init__(self, engine: Engine, prompt: str, *, frames: int, seed: int, jpeg_quality: int = 85):
        self.engine, self.frames, self.seed, self.quality = engine, frames, seed, jpeg_quality
        # One pipeline for every video: it reuses its caches, and so the CUDA graphs captured on them.
        self.pipeline = engine.pipeline()
        self.prompt = prompt
        self.blocks: queue.Queue = queue.Queue(maxsize=_AHEAD_BLOCKS)
        self._pending: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longlive-generator", daemon=True)
        self._switched = False   # a switch happened at the block being generated
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def request_prompt(self, text: str) -> None:
        with self._lock:
            self._pending = text

    def next_block(self):
        """The next (status, jpegs) to show, waiting for it; None once the stream has ended or stopped."""
        while not self._stop.is_set():
            try:
                return self.blocks.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _next_prompt(self, start_frame: int) -> torch.Tensor | None:
        with self._lock:
            text, self._pending = self._pending, None
        if text is None or text == self.prompt:
            return None
        self.prompt = text
        self._switched = True
        return self.engine.encoder.encode([text])[0]

    def _jpeg(self, frame) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.blocks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            video = 0
            while not self._stop.is_set():
                self._one_video(video)
                video += 1
        except BaseException as e:  # noqa: BLE001 - reported to the page and the console, then the stream ends
            self.error = e
            print(f"longlive-triton serve: the generator stopped: {type(e).__name__}: {e}", file=sys.stderr)
            self._put(None)

    def _one_video(self, video: int) -> None:
        engine = self.engine
        noise = engine.noise(self.frames, self.seed + video)
        [first] = engine.encoder.encode([self.prompt])
        self._switched = False
        mark = time.perf_counter()
        for block in iter_video(self.pipeline, engine.vae, noise, first, next_prompt=self._next_prompt):
            frames = to_uint8(block.pixels[0])
            ms = (time.perf_counter() - mark) * 1e3
            status = {"type": "block", "video": video, "block": block.index, "start_frame": block.start_frame,
                      "frames": len(frames), "block_ms": ms, "ms_per_frame": ms / len(frames),
                      "prompt": self.prompt, "switched": self._switched, "label": engine.label}
            self._switched = False
            if not self._put((status, [self._jpeg(f) for f in frames])):
                return
            mark = time.perf_counter()


def _page() -> str:
    return resources.files("longlive_triton.app").joinpath("demo.html").read_text(encoding="utf-8")


def make_app(session: LiveSession, fps: float):
    """The aiohttp application: the page, the frame WebSocket, the prompt endpoint, the player task."""
    from aiohttp import WSCloseCode, WSMsgType, web

    clients: set = set()
    last_status: dict = {}

    async def broadcast(message) -> None:
        for ws in list(clients):
            try:
                await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
            except (ConnectionError, RuntimeError):
                clients.discard(ws)

    async def player(app) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(None, session.next_block)
            if item is None:
                if session.error is not None:
                    error = f"{type(session.error).__name__}: {session.error}"
                    await broadcast(json.dumps({"type": "error", "message": error}))
                return
            status, jpegs = item
            last_status.update(status, fps=fps)
            await broadcast(json.dumps(last_status))
            for jpeg in jpegs:
                due = loop.time() + 1.0 / fps
                await broadcast(jpeg)
                await asyncio.sleep(max(0.0, due - loop.time()))

    async def index(request):
        return web.Response(text=_page(), content_type="text/html")

    async def frames(request):
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        clients.add(ws)
        if last_status:
            await ws.send_str(json.dumps(last_status))
        async for msg in ws:  # the page sends nothing; this waits for it to go away
            if msg.type == WSMsgType.ERROR:
                break
        clients.discard(ws)
        return ws

    async def prompt(request):
        try:
            text = str((await request.json())["prompt"]).strip()
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "expected JSON {\"prompt\": \"...\"}"}, status=400)
        if not text or len(text) > _MAX_PROMPT:
            return web.json_response({"error": f"the prompt must be 1 to {_MAX_PROMPT} characters"}, status=400)
        session.request_prompt(text)
        return web.json_response({"accepted": text, "applies": "at the next block"})

    async def start(app):
        session.start()
        app["player"] = asyncio.create_task(player(app))

    async def shutdown(app):
        for ws in list(clients):  # open WebSockets would hold the server's shutdown until they time out
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def cleanup(app):
        app["player"].cancel()
        await asyncio.get_running_loop().run_in_executor(None, session.stop)

    app = web.Application()
    app.add_routes([web.get("/", index), web.get("/ws", frames), web.post("/prompt", prompt)])
    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


async def _serve(app, host: str, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"serving on http://{host}:{bound} (Ctrl-C stops)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(args) -> int:
    try:
        import aiohttp  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("serve needs aiohttp and pillow: pip install 'longlive-triton[app]'") from None
    if args.frames <= 0 or args.frames % FRAMES_PER_BLOCK:
        raise UsageError(f"--frames {args.frames}: must be a positive multiple of {FRAMES_PER_BLOCK}")
    if args.fps <= 0:
        raise UsageError(f"--fps {args.fps}: must be positive")
    engine = build_engine(args, choose_device(args.device), need_text_encoder=True)
    print(engine.label)
    for report in engine.reports:
        print(report)
    session = LiveSession(engine, args.prompt, frames=args.frames, seed=args.seed, jpeg_quality=args.jpeg_quality)
    try:
        asyncio.run(_serve(make_app(session, args.fps), args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0
