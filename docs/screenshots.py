"""Remakes docs/dashboard-trial.png and docs/report.png with headless Chromium (Debian chromium + chromium-driver).

    .venv/bin/python docs/screenshots.py --storage sqlite:///hpsearch.db STUDY [STUDY ...]

Serves ``hpsearch dashboard`` on a free loopback port and shoots the best trial of the first study; writes
``hpsearch report`` of all the studies into a temporary folder and shoots its index.html (offline: file://).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def browser(width: int, height: int):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--storage", default="sqlite:///hpsearch.db")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", "--storage", args.storage,
                               "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                summaries = json.load(urllib.request.urlopen(url + "/api/studies"))["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        sid = next(s["study_id"] for s in summaries if s["study_name"] == args.studies[0])
        study = json.load(urllib.request.urlopen(f"{url}/api/studies/{sid}"))
        best = study["best_trials"][0]["number"]
        driver = browser(1400, 1500)
        try:
            driver.get(f"{url}/dashboard/studies/{sid}/trials?numbers={best}")
            time.sleep(8)  # the SPA renders the note's Markdown and loads the artifact images
            driver.save_screenshot(str(DOCS / "dashboard-trial.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "hpsearch", "report", *args.studies, "--storage", args.storage,
                        "--out", tmp], check=True, stdout=subprocess.DEVNULL)
        driver = browser(1400, 1500)
        try:
            driver.get(Path(tmp, "index.html").as_uri())
            time.sleep(5)
            driver.save_screenshot(str(DOCS / "report.png"))
        finally:
            driver.quit()
    print(f"wrote {DOCS / 'dashboard-trial.png'} and {DOCS / 'report.png'}")


if __name__ == "__main__":
    main()
