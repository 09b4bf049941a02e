"""Take a PNG screenshot of a web page with headless Chromium.

Used to make docs/figures/mlflow-*.png from a running MLflow UI (see tools/mlflow_ui.sh), e.g.

    python tools/screenshot.py --url 'http://127.0.0.1:5055/#/models/cmunet-demo' \
        --out docs/figures/mlflow-demo-model.png

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CHROMIUM = "/usr/bin/chromium"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--wait-ms", type=int, default=8000,
                   help="virtual time the page gets to render before the shot")
    args = p.parse_args(argv)

    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"error: {CHROMIUM} not found; install Debian's package: apt-get install -y chromium")

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp_out = f"{out}.tmp-{os.getpid()}.png"
    profile = tempfile.mkdtemp(prefix="chromium-shot-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size={args.width},{args.height}",
           f"--virtual-time-budget={args.wait_ms}", f"--screenshot={tmp_out}", args.url]
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0 or not os.path.exists(tmp_out) or os.path.getsize(tmp_out) == 0:
            sys.stderr.write(res.stdout)
            sys.exit(f"error: chromium failed (exit {res.returncode}); no screenshot written")
        os.replace(tmp_out, out)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        if os.path.exists(tmp_out):
            os.remove(tmp_out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
