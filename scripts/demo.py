"""`make demo`: set up the embedded platform, load a demo canary and serve it until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--exit", action="store_true", help="set up and exit without serving")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")
    manage("migrate", "--noinput", "-v", "0")
    manage("createdemoadmin")
    manage("seeddemo")
    base = f"http://127.0.0.1:{args.port}"
    print(f"\nRampart is ready.\n  UI and admin: {base}/admin/  (login admin / rampart-demo)")
    print(f"  API docs:     {base}/api/docs/\n  API schema:   {base}/api/schema/")
    if args.exit:
        return 0
    print("Serving until Ctrl-C.\n", flush=True)
    try:
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port),
            ],
            cwd=ROOT,
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
