"""The web console in a real browser: Debian's headless chromium driven by Selenium
through chromium-driver (both installed by .ci/run), against a real broker with data.
Every page is loaded and checked and a screenshot of it kept under the test's temporary
directory (and copied to $NODI_CONSOLE_SCREENSHOTS when set: docs/console.md's images
are made that way); messages are browsed by offset and by time through the form, a group
is reset and a dead letter redriven through the forms and their confirmations, and the
redriven message is delivered again. JavaScript is off: the pages are plain links and
forms."""

from __future__ import annotations

import functools
import os
import shutil

import pytest

from nodi.broker import Client

from conftest import BrokerProcess
from test_console import fill, start_with_console

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


def save_screenshot(browser, directory, name: str) -> None:
    """Keep a screenshot of the page under the test's directory, and a copy in
    $NODI_CONSOLE_SCREENSHOTS when set (how docs/console.md's images are made)."""
    path = directory / f"{name}.png"
    assert browser.save_screenshot(str(path))
    copies = os.environ.get("NODI_CONSOLE_SCREENSHOTS")
    if copies:
        shutil.copy(path, os.path.join(copies, f"{name}.png"))


def click_and_wait(browser, element) -> None:
    """Click a link or a form's button and wait for the next page to replace this one."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")
    element.click()

    def replaced(_) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            # chromedriver, asked about a node while the next document replaces it, may
            # answer with the inspector's error rather than a stale reference.
            if "does not belong to the document" in (error.msg or ""):
                return True
            raise
        return False

    WebDriverWait(browser, 30).until(replaced)
    # The next page whole (the driver's scripts run though the pages' would not).
    WebDriverWait(browser, 30).until(lambda _: browser.execute_script("return document.readyState") == "complete")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--blink-settings=scriptEnabled=false",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_every_page_in_a_browser_with_a_reset_and_a_redrive(tmp_path, browser) -> None:
    from selenium.webdriver.common.by import By

    process, port = start_with_console(str(tmp_path / "data"))
    base = f"http://127.0.0.1:{port}"
    shot = functools.partial(save_screenshot, browser, tmp_path)
    click = functools.partial(click_and_wait, browser)

    def cells(table_id: str) -> list[list[str]]:
        rows = browser.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
        return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]

    try:
        with Client(process.address) as client:
            fill(client)
            browser.get(base + "/")
            assert browser.title == "Overview - nodi console"
            assert ["orders", "2", "40"] in [row[:3] for row in cells("topics")]
            shot("overview")

            click(browser.find_element(By.LINK_TEXT, "orders"))
            assert [row[:4] for row in cells("partitions")] == [["0", "0", "30", "30"], ["1", "0", "10", "10"]]
            shot("topic")

            click(browser.find_elements(By.LINK_TEXT, "browse")[0])
            form = browser.find_element(By.ID, "browse")
            form.find_element(By.NAME, "offset").send_keys("3")
            form.find_element(By.NAME, "count").clear()
            form.find_element(By.NAME, "count").send_keys("4")
            click(form.find_element(By.TAG_NAME, "button"))
            assert [row[0] for row in cells("messages")] == ["3", "4", "5", "6"]
            shot("messages")
            click(browser.find_element(By.LINK_TEXT, "newer"))
            assert [row[0] for row in cells("messages")][0] == "7"
            form = browser.find_element(By.ID, "browse")
            form.find_element(By.NAME, "offset").clear()
            form.find_element(By.NAME, "time").send_keys("2026-01-01T00:00:20Z")
            click(form.find_element(By.TAG_NAME, "button"))
            assert [row[0] for row in cells("messages")][:2] == ["20", "21"]

            click(browser.find_element(By.LINK_TEXT, "Stream groups"))
            assert cells("groups")[0][:2] == ["billing", "empty"]
            shot("groups")
            click(browser.find_element(By.LINK_TEXT, "billing"))
            assert cells("lags")[0][:5] == ["orders", "0", "10", "30", "20"]
            shot("group")
            reset = browser.find_element(By.ID, "reset")
            reset.find_element(By.CSS_SELECTOR, "input[value=earliest]").click()
            click(reset.find_element(By.TAG_NAME, "button"))
            assert "to earliest" in browser.find_element(By.ID, "confirm-text").text
            shot("group-reset-confirm")
            click(browser.find_element(By.ID, "confirm").find_element(By.TAG_NAME, "button"))
            assert "reset to earliest" in browser.find_element(By.ID, "done").text
            assert client.fetch_offsets("billing", ["orders"]) == {("orders", 0): 0, ("orders", 1): 0}

            click(browser.find_element(By.LINK_TEXT, "Queue groups"))
            assert cells("queues")[0][:2] == ["workers", "jobs"]
            shot("queues")
            # Two messages in flight: one leased, one nacked and waiting for its retry.
            client.produce("jobs", b"job 3", partition=0)
            client.produce("jobs", b"job 4", partition=0)
            with client.queue("jobs", "workers", batch_max=2) as queue:
                leased = queue.receive(timeout_ms=20_000)
                assert leased is not None
                failing = queue.receive(timeout_ms=20_000)
                assert failing is not None
                failing.nack(delay_ms=600_000, error="printer on fire")
                click(browser.find_element(By.LINK_TEXT, "workers"))
                assert cells("queue-partitions")[0][:2] == ["0", "3"]
                assert [row[:4] for row in cells("queue-leases")] == [
                    ["0", "3", "leased", "1"],
                    ["0", "4", "waiting", "1"],
                ]
                shot("queue")
                leased.ack()

            click(browser.find_element(By.LINK_TEXT, "Dead letters"))
            assert cells("dead-letter-topics")[0][:2] == ["jobs.dlq", "3"]
            shot("dead-letters")
            click(browser.find_element(By.LINK_TEXT, "jobs.dlq"))
            assert [row[4] for row in cells("dead-letters")] == ["rejected"] * 3
            shot("dead-letter")
            redrive = browser.find_element(By.ID, "redrive")
            redrive.find_element(By.NAME, "count").send_keys("1")
            click(redrive.find_element(By.TAG_NAME, "button"))
            click(browser.find_element(By.ID, "confirm").find_element(By.TAG_NAME, "button"))
            assert browser.find_element(By.ID, "done").text == "redrove 1 message(s) from jobs.dlq"
            with client.queue("jobs", "workers") as queue:
                delivered = queue.receive(timeout_ms=20_000)
                assert delivered is not None
                assert delivered.value == b"job 0"
                delivered.ack()
            click(browser.find_element(By.LINK_TEXT, "Back"))
            assert "2 entries waiting" in browser.find_element(By.ID, "waiting").text
            # Tick one entry and redrive just it.
            browser.find_element(By.NAME, "pick-0-2").click()
            click(browser.find_element(By.ID, "redrive-picked"))
            assert "ticked entry (partition:offset 0:2)" in browser.find_element(By.ID, "confirm-text").text
            shot("dead-letter-picked-confirm")
            click(browser.find_element(By.ID, "confirm").find_element(By.TAG_NAME, "button"))
            assert browser.find_element(By.ID, "done").text == "redrove 1 message(s) from jobs.dlq"
            click(browser.find_element(By.LINK_TEXT, "Back"))
            assert "1 entry waiting" in browser.find_element(By.ID, "waiting").text
            assert [row[1] for row in cells("dead-letters")] == ["1"]
    finally:
        process.stop()


def test_signing_in_and_out_in_a_browser(tmp_path, browser) -> None:
    """With a users file: a page asks for the sign-in form, a wrong password is told so, the
    right one lands on the page first asked for with the user shown, a page the user may not
    see is refused, and signing out asks for the form again."""
    from selenium.webdriver.common.by import By

    from nodi.broker.server.users import hash_password

    from test_console import free_port

    users = tmp_path / "users.toml"
    users.write_text(
        f'[users.alice]\npassword = "{hash_password("alice-Secret-2")}"\n'
        '[users.alice.consume]\nallow = ["orders"]\n'
        f'[users.root]\npassword = "{hash_password("root-Secret-1")}"\nsuperuser = true\n'
    )
    port = free_port()
    process = BrokerProcess(
        str(tmp_path / "data"), ["--console-port", str(port)], environment={"NODI_SECURITY_USERS_FILE": str(users)}
    ).start()
    base = f"http://127.0.0.1:{port}"
    shot = functools.partial(save_screenshot, browser, tmp_path)
    click = functools.partial(click_and_wait, browser)

    def sign_in(password: str) -> None:
        browser.find_element(By.ID, "login-user").clear()
        browser.find_element(By.ID, "login-user").send_keys("alice")
        browser.find_element(By.ID, "login-password").send_keys(password)
        click(browser.find_element(By.ID, "login-submit"))

    try:
        with Client(process.address, user="root", password="root-Secret-1") as client:
            client.create_topic("orders")
            client.create_topic("payroll")
            client.produce("orders", b'{"order": 1}')
        browser.get(base + "/messages?topic=orders&partition=0&offset=0")
        assert browser.title == "Sign in - nodi console"
        shot("login")
        sign_in("not-her-password")
        assert browser.find_element(By.ID, "error").text == "unknown user or wrong password"
        sign_in("alice-Secret-2")
        assert browser.title == "Messages of orders-0 - nodi console"
        assert browser.find_element(By.ID, "user").text == "alice"
        browser.get(base + "/")
        assert [
            row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#topics tbody tr")
        ] == ["orders"]
        browser.get(base + "/topic?name=payroll")
        assert browser.find_element(By.ID, "error").text == "alice may not consume topic payroll"
        shot("refused")
        click(browser.find_element(By.ID, "logout").find_element(By.TAG_NAME, "button"))
        assert browser.title == "Sign in - nodi console"
        browser.get(base + "/")
        assert browser.title == "Sign in - nodi console"
    finally:
        process.stop()
