#!/usr/bin/env python
"""Make the README's TensorBoard screenshots from a fresh run of the demo (by hand; not part of CI).

What it does:

1. runs ``lightning-introspect demo --out <dir>`` (``--fast`` / ``--epochs`` are passed through; ``--logdir``
   skips training and reuses an existing log root);
2. starts ``tensorboard --logdir <dir> --host 127.0.0.1 --port <free port>`` (loopback only) and waits
   until it serves the tags the screenshots need;
3. drives headless Chromium from the OS packages over the DevTools protocol on a pipe (no network port;
   a new empty profile, no background networking) to open TensorBoard's own dashboards:

   - ``tensorboard_attributions.png``: the Images dashboard filtered (``#images&tagFilter=...``) to the
     attribution grids (input samples and the Grad-CAM overlays), "Show actual image size" switched on;
   - ``tensorboard_per_class.png``: the Images dashboard filtered to the per-class bar chart;
   - ``tensorboard_probes.png``: the Scalars dashboard filtered to ``introspect/probes``;

4. stops TensorBoard and Chromium (bounded waits, in ``finally``) and writes the PNGs, cropped to the
   filtered cards and shrunk below ``--max-kb``, to ``docs/images/``.

Needs the package installed (the project's virtual environment) and Chromium: on Debian/Ubuntu
``apt-get update && apt-get install -y chromium``.

Example::

    python docs/screenshot.py --fast --images-dir /tmp/shots   # dry run, about a minute
    python docs/screenshot.py                                 # default demo (6 epochs), docs/images/
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RUN = "digits/version_0"  # the demo's run name under the log root (``--name digits``, first version)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
]


@dataclass
class Shot:
    """One screenshot: a TensorBoard dashboard with a tag filter, cropped to the filtered cards."""

    file: str
    plugin: str  # "images" or "scalars": the legacy dashboards, whose tag filter lives in the URL hash
    tag_filter: str  # a regular expression (the same in Python and JavaScript for these patterns)
    width: int  # viewport width in CSS pixels
    actual_size: bool = False  # Images dashboard: tick "Show actual image size"
    optional: bool = False  # a failure only warns


SHOTS = [
    Shot(
        "tensorboard_attributions.png",
        "images",
        r"^introspect/attributions/grad_cam$",
        1540,
        actual_size=True,
    ),
    Shot("tensorboard_per_class.png", "images", r"^introspect/per_class/bars$", 1380, actual_size=True),
    Shot(
        "tensorboard_probes.png",
        "scalars",
        r"^introspect/probes/(features\.\d+|flatten)/accuracy$",
        1200,
        optional=True,
    ),
]

# Helpers evaluated in the page. TensorBoard's dashboards are Polymer elements inside shadow roots, so
# ``document.querySelector`` cannot see them: walk every shadow root.
JS_LIB = r"""
const deepAll = (node, name, out = []) => {
  const roots = node.shadowRoot ? [node, node.shadowRoot] : [node];
  for (const root of roots) {
    for (const el of root.querySelectorAll('*')) {
      if (el.localName === name) out.push(el);
      if (el.shadowRoot) deepAll(el.shadowRoot, name, out);
    }
  }
  return out;
};
const firstView = (dashName) => {
  const dash = deepAll(document, dashName)[0];
  if (!dash) return [null, null];
  return [dash, deepAll(dash, 'tf-category-paginated-view')[0] || null];
};
const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
"""

JS_IMAGES_STATE = r"""(() => {
  const [dash, view] = firstView('tf-image-dashboard');
  if (!view) return {ready: false, why: dash ? 'no category yet' : 'no images dashboard yet'};
  const loaders = deepAll(view, 'tf-image-loader');
  const images = loaders.map((l) => deepAll(l, 'img')[0]).filter((img) => img);
  const done = images.filter((img) => img.complete && img.naturalWidth > 0);
  const busy = loaders.some((l) => l._isImageLoading);
  const boxes = loaders.map(box);
  return {ready: loaders.length > 0 && done.length === loaders.length && !busy, present: loaders.length >= EXPECTED,
          why: `${done.length}/${loaders.length} images loaded`, cards: loaders.length,
          view: box(view), cardBoxes: boxes, natural: done.map((img) => [img.naturalWidth, img.naturalHeight])};
})()"""

JS_ACTUAL_SIZE = r"""(() => {
  const [dash] = firstView('tf-image-dashboard');
  const box = deepAll(dash, 'paper-checkbox').find((c) => /actual image size/i.test(c.textContent));
  if (box) { if (!box.checked) box.click(); return 'clicked'; }
  dash._actualSize = true;  // fallback: the property the checkbox is bound to
  return 'property';
})()"""

# The Scalars dashboard clips the y axis to hide outliers by default, which cuts off the first (untrained)
# probe points: untick "Ignore outliers in chart scaling" (a setting kept in this throwaway profile only).
JS_KEEP_OUTLIERS = r"""(() => {
  const [dash] = firstView('tf-scalar-dashboard');
  const box = deepAll(dash, 'paper-checkbox').find((c) => /ignore outliers/i.test(c.textContent));
  if (box) { if (box.checked) box.click(); return 'clicked'; }
  dash._ignoreYOutliers = false;
  return 'property';
})()"""

JS_SCALARS_STATE = r"""(() => {
  const [dash, view] = firstView('tf-scalar-dashboard');
  if (!view) return {ready: false, why: dash ? 'no category yet' : 'no scalars dashboard yet'};
  const cards = deepAll(view, 'tf-scalar-card');
  const charts = cards.map((c) => deepAll(c, 'vz-line-chart2')[0]).filter((c) => c);
  // Plottable draws into SVG: an empty chart has only its axis path; data adds a line (or a lone point).
  const drawn = charts.filter((c) => deepAll(c, 'path').filter((p) => (p.getAttribute('d') || '').length > 0).length >= 2);
  return {ready: cards.length > 0 && drawn.length === cards.length, present: cards.length >= EXPECTED,
          why: `${drawn.length}/${cards.length} charts drawn`, cards: cards.length, view: box(view),
          cardBoxes: cards.map(box)};
})()"""


# --------------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fd 3 in, fd 4 out).


class Chromium:
    """A headless Chromium driven through ``--remote-debugging-pipe`` (messages are NUL-terminated JSON)."""

    def __init__(self, binary: str, profile: str, log_path: str) -> None:
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # Move the child's ends to fds >= 10 (close-on-exec) so dup2 onto 3 and 4 cannot clobber them.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        argv = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        try:
            self.pid = os.posix_spawn(
                binary,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                    (os.POSIX_SPAWN_DUP2, child_in, 3),
                    (os.POSIX_SPAWN_DUP2, child_out, 4),
                ],
                setpgroup=0,  # its own process group, so stop() reaches the renderer and GPU helpers too
            )
        finally:
            for fd in (child_in, child_out, log, null):
                os.close(fd)
        self._buffer = b""
        self._id = 0
        self._session: str | None = None
        self._target: str | None = None

    def _message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium exited (see its log above)")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, page: bool = True, timeout: float = 30.0
    ) -> Any:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data) :]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:  # everything else is an event we do not need
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open_page(self, width: int, height: int) -> None:
        self._target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": self._target, "flatten": True}, page=False)
        self._session = attached["sessionId"]
        self.resize(width, height)

    def close_page(self) -> None:
        if self._target is not None:
            self.call("Target.closeTarget", {"targetId": self._target}, page=False)
        self._target = self._session = None

    def resize(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": f"(() => {{{JS_LIB}\nreturn {expression};\n}})()", "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(
                f"JavaScript error: {result['exceptionDetails'].get('exception', result['exceptionDetails'])}"
            )
        return result["result"].get("value")

    def wait_for(
        self, expression: str, timeout: float, *, key: str = "ready", settle: float = 1.0
    ) -> dict[str, Any]:
        """Poll ``expression`` (returning ``{ready, present, why, ...}``) until ``key`` holds twice, ``settle`` s apart."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {"why": "not evaluated"}
        while time.monotonic() < deadline:
            state = self.evaluate(expression) or {"why": "no value"}
            if state.get(key):
                time.sleep(settle)  # let late layout (the slider, fonts) land, then confirm
                state = self.evaluate(expression) or {"why": "no value"}
                if state.get(key):
                    return state
            time.sleep(0.5)
        raise TimeoutError(f"the page was not ready after {timeout:.0f} s: {state.get('why')}")

    def screenshot(self, clip: tuple[float, float, float, float]) -> bytes:
        x0, y0, x1, y1 = clip
        params = {
            "format": "png",
            "clip": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "scale": 1},
        }
        return base64.b64decode(self.call("Page.captureScreenshot", params, timeout=60)["data"])

    def stop(self) -> None:
        for fd in (self._w, self._r):
            try:
                os.close(fd)  # closing the pipe alone makes Chromium quit
            except OSError:
                pass
        _stop_group(self.pid)


def _stop_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid`` (ours), wait a bounded time, then SIGKILL; reap ``pid``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# TensorBoard


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tensorboard_command() -> list[str]:
    beside = Path(sys.executable).with_name("tensorboard")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tensorboard")
    return [found] if found else [sys.executable, "-m", "tensorboard.main"]


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return json.loads(response.read())


def _wait_for_tags(
    base: str, proc: subprocess.Popen, needed: dict[str, list[str]], timeout: float
) -> dict[str, list[str]]:
    """Wait until TensorBoard serves, for the demo run, a tag matching every pattern; return the matches."""
    deadline = time.monotonic() + timeout
    missing: list[str] = list(needed)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
        found: dict[str, list[str]] = {}
        try:
            for plugin, patterns in needed.items():
                tags = list(_get_json(f"{base}/data/plugin/{plugin}/tags").get(RUN, {}))
                for pattern in patterns:
                    found[pattern] = sorted(t for t in tags if re.search(pattern, t))
            missing = [p for p, tags in found.items() if not tags]
            if not missing:
                return found
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass  # not listening yet
        time.sleep(1.0)
    raise TimeoutError(f"tensorboard did not serve tags for {missing} in run {RUN!r} within {timeout:.0f} s")


# --------------------------------------------------------------------------------------------------
# The pictures


def _shrink(png: bytes, max_kb: int) -> tuple[bytes, str]:
    """Re-encode ``png`` below ``max_kb`` KB: optimised PNG, then a 256-colour palette, then downscaling."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    note = "optimised"
    candidate = image
    for step in range(8):
        buffer = io.BytesIO()
        candidate.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_kb * 1024:
            return buffer.getvalue(), note
        if step == 0:
            candidate = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            note = "256-colour palette"
        else:
            scale = 0.85**step
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            candidate = image.resize(size, Image.Resampling.LANCZOS).quantize(
                colors=256, dither=Image.Dither.NONE
            )
            note = f"256 colours, scaled to {size[0]}x{size[1]}"
    raise RuntimeError(f"could not bring the image below {max_kb} KB")


def _clip(
    state: dict[str, Any], width: int, height: int, margin: int = 16
) -> tuple[float, float, float, float]:
    """The whole width, from the top (TensorBoard's header, the sidebar) down to the filtered cards' bottom."""
    bottom = max([state["view"][3]] + [b[3] for b in state["cardBoxes"]]) + margin
    right = max(b[2] for b in state["cardBoxes"])
    if right > width:
        print(
            f"  note: the cards reach x={right:.0f}, wider than the {width}px viewport (raise Shot.width)",
            file=sys.stderr,
        )
    return 0.0, 0.0, float(width), float(min(height, bottom))


def _take(browser: Chromium, base: str, shot: Shot, cards: int, timeout: float) -> bytes:
    hash_ = f"{shot.plugin}&tagFilter={urllib.parse.quote(shot.tag_filter, safe='')}"
    if shot.plugin == "scalars":
        hash_ += "&_smoothingWeight=0"  # a handful of points per curve: show them as they are
    height = 900
    browser.resize(shot.width, height)
    browser.navigate(f"{base}/#{hash_}")
    expression = (JS_IMAGES_STATE if shot.plugin == "images" else JS_SCALARS_STATE).replace(
        "EXPECTED", str(cards)
    )
    state = browser.wait_for(expression, timeout, key="present", settle=0.5)
    if shot.actual_size:
        browser.evaluate(JS_ACTUAL_SIZE)
    if shot.plugin == "scalars":
        browser.evaluate(JS_KEEP_OUTLIERS)
    # Make the viewport tall enough for every filtered card (off-screen charts may not draw), then wait.
    needed = int(max([state["view"][3]] + [b[3] for b in state["cardBoxes"]])) + 40
    if needed > height:
        height = needed
        browser.resize(shot.width, height)
    state = browser.wait_for(expression, timeout)
    if state["cards"] != cards:
        print(f"  note: {state['cards']} cards on the page, {cards} tags match", file=sys.stderr)
    return browser.screenshot(_clip(state, shot.width, height))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo log root (default: a temporary folder, removed at the end)")
    parser.add_argument("--logdir", help="reuse this existing demo log root and skip training")
    parser.add_argument("--fast", action="store_true", help="pass --fast to the demo (a dry run)")
    parser.add_argument("--epochs", type=int, help="pass --epochs to the demo (its default: 6)")
    parser.add_argument(
        "--images-dir", default=str(HERE / "images"), help="where the PNGs go (default: docs/images)"
    )
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each page / for TensorBoard"
    )
    parser.add_argument("--max-kb", type=int, default=400, help="largest PNG size in KB (default: 400)")
    args = parser.parse_args(argv)

    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not os.access(chromium, os.X_OK):
        print(
            "Chromium not found: apt-get update && apt-get install -y chromium  (or pass --chromium)",
            file=sys.stderr,
        )
        return 2
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive int, got {args.epochs}")

    work = Path(tempfile.mkdtemp(prefix="li-screenshot-"))
    images_dir = Path(args.images_dir)
    tensorboard: subprocess.Popen | None = None
    browser: Chromium | None = None
    failures: list[str] = []
    try:
        if args.logdir:
            logdir = Path(args.logdir)
        else:
            logdir = Path(args.out) if args.out else work / "introspect_runs"
            demo = [sys.executable, "-m", "lightning_introspect.cli", "demo", "--out", str(logdir)]
            demo += ["--fast"] if args.fast else []
            demo += ["--epochs", str(args.epochs)] if args.epochs is not None else []
            print("$", " ".join(demo), flush=True)
            subprocess.run(demo, check=True, env={**os.environ, "MPLBACKEND": "Agg"})
        if not (logdir / RUN).is_dir():
            raise FileNotFoundError(f"no demo run {RUN!r} under {logdir}")

        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        # Started from the log root's parent with a relative --logdir, so the sidebar shows a name like the
        # README's ``tensorboard --logdir introspect_runs`` rather than a temporary path.
        logdir = logdir.resolve()
        command = [
            *_tensorboard_command(),
            "--logdir",
            logdir.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        print(f"$ cd {logdir.parent} && {' '.join(command)}", flush=True)
        tb_log = open(work / "tensorboard.log", "wb")  # noqa: SIM115 - closed with the process below
        tensorboard = subprocess.Popen(
            command, cwd=logdir.parent, stdout=tb_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        tb_log.close()
        needed: dict[str, list[str]] = {}
        for shot in SHOTS:
            needed.setdefault(shot.plugin, []).append(shot.tag_filter)
        matches = _wait_for_tags(base, tensorboard, needed, args.timeout)

        profile = work / "profile"
        profile.mkdir()
        browser = Chromium(chromium, str(profile), str(work / "chromium.log"))
        browser.open_page(1400, 900)
        images_dir.mkdir(parents=True, exist_ok=True)
        for shot in SHOTS:
            print(
                f"{shot.file}: #{shot.plugin} filtered to {shot.tag_filter} ({len(matches[shot.tag_filter])} tags)",
                flush=True,
            )
            try:
                png, note = _shrink(
                    _take(browser, base, shot, len(matches[shot.tag_filter]), args.timeout), args.max_kb
                )
            except (TimeoutError, RuntimeError, KeyError) as error:
                failures.append(f"{shot.file}: {error}")
                print(f"  FAILED: {error}", file=sys.stderr)
                continue
            (images_dir / shot.file).write_bytes(png)
            print(f"  wrote {images_dir / shot.file} ({len(png) // 1024} KB, {note})", flush=True)
    finally:
        if browser is not None:
            browser.stop()
        if tensorboard is not None:
            tensorboard.terminate()
            try:
                tensorboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tensorboard.kill()
                tensorboard.wait(timeout=10)
        for name in ("tensorboard.log", "chromium.log"):
            if failures and (work / name).exists():
                print(
                    f"--- last lines of {name} ---\n"
                    + "\n".join((work / name).read_text(errors="replace").splitlines()[-15:]),
                    file=sys.stderr,
                )
        shutil.rmtree(work, ignore_errors=True)
    optional = {shot.file for shot in SHOTS if shot.optional}
    hard = [failure for failure in failures if failure.split(":", 1)[0] not in optional]
    return 1 if hard else 0


if __name__ == "__main__":
    raise SystemExit(main())
