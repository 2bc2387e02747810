"""Open a saved HTML page in headless Chromium (selenium): for the browser tests and benchmarks/screenshot.py."""

from __future__ import annotations

from pathlib import Path

_COUNT_CANVASES = """
function count(root) {
  let n = root.querySelectorAll('canvas').length;
  for (const element of root.querySelectorAll('*')) { if (element.shadowRoot) n += count(element.shadowRoot); }
  return n;
}
return count(document);
"""


def check_in_browser(path, screenshot=None, *, min_canvases: int = 1, width: int = 1400, height: int = 1800,
                     timeout: float = 60.0, chromium: str = "/usr/bin/chromium",
                     chromedriver: str = "/usr/bin/chromedriver", widths: dict | None = None,
                     script: str | None = None, answers: dict | None = None) -> list[str]:
    """Open a saved HTML file in headless Chromium, wait until Bokeh has drawn, return the console errors.

    Needs selenium and Debian's ``chromium`` and ``chromium-driver``. Bokeh draws into canvases inside
    shadow roots; the page counts as rendered when at least ``min_canvases`` exist.

    Parameters
    ----------
    path
        The HTML file.
    screenshot
        Where to save a PNG screenshot (optional).
    widths
        A dict to fill with ``scroll`` (the document's scrollWidth) and ``window`` (innerWidth), in px.
    script, answers
        JavaScript to run once the page has drawn (a promise it returns is awaited); what it returns
        goes into ``answers["script"]``.

    Returns
    -------
    list of str
        The SEVERE messages of the browser console (empty when the page is clean).
    """
    import time as _time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        browser.get(Path(path).resolve().as_uri())
        WebDriverWait(browser, timeout).until(lambda b: b.execute_script(_COUNT_CANVASES) >= min_canvases)
        _time.sleep(0.5)
        if screenshot is not None:
            browser.save_screenshot(str(screenshot))
        if widths is not None:
            widths.update(browser.execute_script(
                "return {scroll: document.documentElement.scrollWidth, window: window.innerWidth};"))
        if script is not None and answers is not None:
            answers["script"] = browser.execute_script(script)
        return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
