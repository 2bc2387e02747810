"""Screenshot an eels-ad HTML report in headless Chromium, after Bokeh has drawn its canvases.

Usage: python benchmarks/screenshot.py REPORT.html OUT.png [--width 1500 --height 1300]
Needs Debian's chromium and chromium-driver, and selenium (dev extra).
"""

import argparse
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

COUNT_CANVASES = """
function count(root) {
  let n = root.querySelectorAll('canvas').length;
  for (const element of root.querySelectorAll('*')) { if (element.shadowRoot) n += count(element.shadowRoot); }
  return n;
}
return count(document);
"""

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1300)
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     f"--window-size={args.width},{args.height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(args.report.resolve().as_uri())
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(COUNT_CANVASES) >= 4)
        time.sleep(1.0)
        browser.save_screenshot(str(args.out))
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
    print(f"wrote {args.out}; console errors: {errors or 'none'}")
