// Drives Kiln's dashboard in headless Chromium: submits work through the page, watches
// a build's progress bar move and its log grow live, stops the build, sees a delayed
// run as scheduled, fires a schedule, pauses and resumes a builder, and saves
// screenshots of the main pages. Run by server/tests/browser.rs, which starts the
// server and passes KILN_URL, KILN_TOKEN, KILN_SHOTS and KILN_CHROMIUM.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const url = process.env.KILN_URL;
const token = process.env.KILN_TOKEN;
const shots = process.env.KILN_SHOTS;
const executablePath = process.env.KILN_CHROMIUM || "/usr/bin/chromium";
const STEP = 30_000; // a guard per step: a hang becomes a failure with the step's name

function fail(message) {
  console.error("FAILED: " + message);
  process.exit(1);
}

mkdirSync(shots, { recursive: true });
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // The closed network makes Chromium stall on its own background requests. Playwright
  // gives every launch a fresh temporary profile (--user-data-dir) of its own.
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
});
let step = "start";
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(STEP);
  const errors = [];
  page.on("pageerror", e => errors.push(e.message));
  // Everything the dashboard loads must come from the server: no CDN.
  const foreign = [];
  page.on("request", r => { if (!r.url().startsWith(url)) foreign.push(r.url()); });

  step = "open the dashboard";
  await page.goto(url + "/#/buildsets");
  await page.evaluate(t => localStorage.setItem("kiln-token", t), token);
  await page.reload();
  await page.waitForSelector("#submit-form");
  await page.waitForSelector("#live.on");

  step = "submit through the page";
  await page.check('input[name=builder][value="slow-progress"]');
  await page.fill("#reason", "browser test");
  await page.click("#submit");
  await page.waitForFunction(() => /^#\/buildsets\/\d+$/.test(location.hash));
  await page.waitForSelector("#tree a[href^='#/builds/']");
  await page.screenshot({ path: join(shots, "buildset.png"), fullPage: true });
  await page.click("#tree a[href^='#/builds/']");
  await page.waitForSelector("#progress .progress");

  step = "watch the progress bar move";
  const current = () => page.$eval("#progress > .progress", el => Number(el.dataset.current));
  await page.waitForFunction(() => Number(document.querySelector("#progress > .progress")?.dataset.current) > 0);
  const first = await current();
  await page.waitForFunction(f => Number(document.querySelector("#progress > .progress")?.dataset.current) > f, first);
  const second = await current();
  if (!(second > first)) fail(`progress did not move: ${first} then ${second}`);
  const width = await page.$eval("#progress > .progress .bar", el => el.style.width);
  if (width === "0%" || width === "0.0%") fail("the bar has no width");

  step = "watch the log appear live";
  await page.waitForSelector("#log .record");
  const running = await page.$eval("#status .badge", el => el.dataset.result);
  if (running !== "RUNNING") fail(`the log should appear while the build runs, it was ${running}`);
  await page.screenshot({ path: join(shots, "build.png"), fullPage: true });

  step = "stop the build";
  await page.click("#stop");
  await page.waitForSelector('#status .badge[data-result="CANCELLED"]');

  step = "a finished build's Stop button is disabled and looks it";
  const stop = await page.$eval("#stop", el => ({ disabled: el.disabled, cursor: getComputedStyle(el).cursor, color: getComputedStyle(el).color }));
  const rebuild = await page.$eval("#rebuild", el => getComputedStyle(el).color);
  if (!stop.disabled || stop.cursor !== "not-allowed" || stop.color === rebuild) fail("the disabled Stop button looks enabled: " + JSON.stringify(stop));

  step = "the log shows each record of its own build once";
  const logIds = async id => (await (await fetch(`${url}/api/v2/builds/${id}/logs?limit=1000`)).json()).logs.map(l => l.id);
  const shownIds = () => page.$$eval("#log .record", els => els.map(e => Number(e.dataset.id)));
  const sameLog = async id => {
    const want = await logIds(id);
    await page.waitForFunction(n => document.querySelectorAll("#log .record").length >= n, want.length);
    const shown = await shownIds();
    if (shown.length !== want.length || new Set(shown).size !== shown.length || !shown.every(i => want.includes(i))) {
      fail(`build ${id}: the page shows records ${JSON.stringify(shown)}, the build has ${JSON.stringify(want)}`);
    }
  };
  const slowId = Number(page.url().split("/").pop());
  await sameLog(slowId);
  // Another build's page shows only that build's records, with the filter at debug.
  const echoBuilds = await (await fetch(`${url}/api/v2/builders/echo/builds`)).json();
  const echoId = echoBuilds.builds[0].buildid;
  await page.selectOption("#level", "warning");
  await page.goto(`${url}/#/builds/${echoId}`);
  await page.waitForSelector(`#log[data-build="${echoId}"]`);
  if ((await page.$eval("#level", el => el.value)) !== "debug") fail("the level filter carried over to another build");
  await sameLog(echoId);
  // And back: a fresh load of the first build, again each record once.
  await page.goto(`${url}/#/builds/${slowId}`);
  await page.waitForSelector(`#log[data-build="${slowId}"]`);
  await sameLog(slowId);

  step = "the main pages";
  await page.goto(url + "/#/buildsets");
  await page.waitForSelector("#buildsets tr[data-bsid]");
  await page.screenshot({ path: join(shots, "buildsets.png"), fullPage: true });
  await page.goto(url + "/#/builders");
  await page.waitForSelector("#builders tr[data-builder]");

  step = "a delayed run is scheduled, not running";
  await page.goto(url + "/#/buildsets/" + process.env.KILN_SCHEDULED);
  await page.waitForSelector('#requests .badge[data-result="SCHEDULED"]');
  await page.goto(url + "/#/builders");
  await page.waitForSelector("#builders tr[data-builder]");

  step = "a schedule shows its next fire and fires on demand";
  await page.goto(url + "/#/schedules");
  await page.waitForSelector('#schedules tr[data-schedule="nightly"] .next-fire');
  const next = await page.$eval('#schedules tr[data-schedule="nightly"] .next-fire', el => el.textContent.trim());
  if (!next) fail("the schedule shows no next fire time");
  await page.screenshot({ path: join(shots, "schedules.png"), fullPage: true });
  await page.click('#schedules tr[data-schedule="nightly"] button.force');
  await page.waitForFunction(() => /^#\/buildsets\/\d+$/.test(location.hash));
  await page.goto(url + "/#/builders");
  await page.waitForSelector("#builders tr[data-builder]");

  step = "locks show their builders and holders";
  await page.goto(url + "/#/locks");
  await page.waitForSelector('#locks tr[data-lock="deploy"] .held');
  const held = await page.$eval('#locks tr[data-lock="deploy"]', el => el.textContent);
  if (!held.includes("slow-progress") || !held.includes("of 2")) fail("the locks page does not show the lock's users and count: " + held);
  await page.screenshot({ path: join(shots, "locks.png"), fullPage: true });
  await page.goto(url + "/#/builders");
  await page.waitForSelector("#builders tr[data-builder]");

  step = "pause and resume a builder";
  const row = '#builders tr[data-builder="echo"]';
  await page.click(`${row} button.toggle-pause`);
  await page.waitForSelector(`${row} .badge.paused`);
  const paused = await (await fetch(url + "/api/v2/builders/echo")).json();
  if (paused.builders[0].paused !== true) fail("the API does not say the builder is paused");
  await page.screenshot({ path: join(shots, "builders.png"), fullPage: true });
  await page.click(`${row} button.toggle-pause`);
  await page.waitForFunction(r => !document.querySelector(`${r} .badge.paused`) && document.querySelector(`${r} button.toggle-pause`)?.textContent === "Pause", row);

  if (errors.length) fail("the page threw: " + errors.join("; "));
  if (foreign.length) fail("the page loaded something from elsewhere: " + foreign.join(", "));
  console.log("ok: submitted, watched progress " + first + " -> " + second + ", saw the log, stopped the build, paused and resumed a builder");
} catch (e) {
  fail(`${step}: ${e.message}`);
} finally {
  await browser.close();
}
