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

  step = "download the raw log";
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#log-download")]);
  const raw = await (await fetch(`${url}/api/v2/builds/${slowId}/log.txt`)).text();
  if (download.suggestedFilename() !== `build-${slowId}.log`) fail("the raw log downloads as " + download.suggestedFilename());
  if (raw.trim().split("\n").length !== (await logIds(slowId)).length) fail("the raw log does not hold every record: " + raw);

  step = "submit with priority, properties and a sourcestamp";
  await page.goto(url + "/#/buildsets");
  await page.waitForSelector("#submit-form");
  await page.check('input[name=builder][value="echo"]');
  await page.click("#submit-more summary");
  await page.fill("#priority", "7");
  await page.fill("#properties", 'version="1.2"\nretries=3');
  await page.fill("#repository", "https://git.example/app");
  await page.fill("#branch", "main");
  await page.click("#submit");
  await page.waitForFunction(() => /^#\/buildsets\/\d+$/.test(location.hash));
  const bsid = Number(page.url().split("/").pop());
  const made = (await (await fetch(`${url}/api/v2/buildsets/${bsid}`)).json()).buildsets[0];
  const props = (await (await fetch(`${url}/api/v2/buildsets/${bsid}/properties`)).json()).properties[0];
  const requests = (await (await fetch(`${url}/api/v2/buildrequests?buildsetid=${bsid}`)).json()).buildrequests;
  if (requests[0]?.priority !== 7) fail("the priority did not reach the request: " + JSON.stringify(requests));
  if (JSON.stringify(props.version?.[0]) !== '"1.2"' || props.retries?.[0] !== 3) fail("the properties did not arrive: " + JSON.stringify(props));
  if (made.sourcestamps?.[0]?.branch !== "main") fail("the sourcestamp did not arrive: " + JSON.stringify(made));

  step = "dark mode follows the system";
  await page.emulateMedia({ colorScheme: "dark" });
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  await page.emulateMedia({ colorScheme: "light" });
  const light = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const luminance = c => c.match(/\d+/g).slice(0, 3).map(Number).reduce((a, b) => a + b, 0);
  if (!(luminance(dark) < 150 && luminance(light) > 600)) fail(`dark ${dark}, light ${light}`);
  await page.emulateMedia({ colorScheme: "dark" });
  await page.screenshot({ path: join(shots, "dark.png"), fullPage: true });
  await page.emulateMedia({ colorScheme: "light" });

  step = "usable at 390 px wide";
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  phone.setDefaultTimeout(STEP);
  for (const [hash, ready] of [["#/buildsets", "#buildsets"], [`#/builds/${slowId}`, "#log .record"], ["#/builders", "#builders"], ["#/locks", "#locks"]]) {
    await phone.goto(url + "/" + hash);
    await phone.waitForSelector(ready);
    const wide = await phone.evaluate(() => document.documentElement.scrollWidth);
    if (wide > 390) fail(`${hash} is ${wide} px wide at 390`);
  }
  await phone.goto(url + "/#/buildsets");
  await phone.waitForSelector("#buildsets");
  await phone.screenshot({ path: join(shots, "phone.png"), fullPage: true });
  await phone.close();

  step = "a buildset's timeline";
  await page.goto(`${url}/#/buildsets/${bsid}`);
  await page.waitForSelector("#timeline .lane[data-buildid] .bar");
  const lanes = await page.$$eval("#timeline .lane[data-buildid] .bar", els => els.map(e => parseFloat(e.style.width)));
  const treeBuilds = await page.$$eval("#tree li[data-buildid]", els => els.length);
  if (lanes.length !== treeBuilds || lanes.some(w => !(w > 0))) fail(`timeline bars ${lanes} for ${treeBuilds} builds`);

  step = "run lists filter and page in the address";
  await page.goto(`${url}/#/buildsets?results=6`);
  await page.waitForSelector("#buildsets tr[data-bsid]");
  const cancelledOnly = await page.$$eval("#buildsets .badge", els => els.map(e => e.dataset.result));
  if (!cancelledOnly.length || cancelledOnly.some(r => r !== "CANCELLED")) fail("the result filter let through " + cancelledOnly);
  // Same page, new hash: the old list stays until the render for the new filter lands,
  // so wait for that render's answer (a filter that matched would never show it).
  await page.goto(`${url}/#/buildsets?reason=nothing-like-this`);
  await page.waitForFunction(() => document.getElementById("range")?.textContent.trim() === "0–0 of 0"
    && document.querySelectorAll("#buildsets tr[data-bsid]").length === 0);
  await page.fill('#filters input[name=reason]', "browser");
  await page.click('#filters button[type=submit]');
  await page.waitForFunction(() => location.hash === "#/buildsets?reason=browser");
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("#buildsets tr[data-bsid] td:nth-child(3)")];
    return rows.length > 0 && rows.every(td => td.textContent.includes("browser"));
  });
  const echoId2 = (await (await fetch(`${url}/api/v2/builders/echo`)).json()).builders[0].builderid;
  await page.goto(`${url}/#/builds?builder=${echoId2}`);
  await page.waitForSelector("#builds tr[data-buildid]");
  const builders = await page.$$eval("#builds tr[data-buildid] td:nth-child(2) a", els => els.map(e => e.textContent));
  if (!builders.length || builders.some(n => n !== "echo")) fail("the builds list's builder filter let through " + builders);

  step = "a builder's page: queue, success rate, recent builds, links";
  await page.click("#builds tr[data-buildid] td:nth-child(2) a");
  await page.waitForSelector("#success-rate");
  if (!/^\d+%/.test((await page.textContent("#success-rate")).trim())) fail("no success rate: " + await page.textContent("#success-rate"));
  if (!/^\d+ waiting/.test((await page.textContent("#queue-depth")).trim())) fail("no queue depth");
  const bars = await page.$$eval("#durations rect", els => els.length);
  const finishedEcho = (await (await fetch(`${url}/api/v2/builders/echo/builds?complete=true`)).json()).meta.total;
  if (bars !== Math.min(40, finishedEcho)) fail(`the duration chart has ${bars} bars for ${finishedEcho} finished builds`);
  const perHour = await page.$$eval("#throughput rect", els => els.map(e => Number(e.getAttribute("height"))));
  if (perHour.length !== 24 || !perHour.some(h => h > 0)) fail("the throughput chart is empty: " + perHour);
  await page.screenshot({ path: join(shots, "builder.png"), fullPage: true });
  await page.click("#recent tr[data-buildid] a");
  await page.waitForSelector("#buildset-link");
  await page.click("#buildset-link");
  await page.waitForFunction(() => /^#\/buildsets\/\d+$/.test(location.hash));

  step = "the main pages";
  await page.goto(url + "/#/buildsets");
  await page.waitForSelector("#buildsets tr[data-bsid]");
  await page.screenshot({ path: join(shots, "buildsets.png"), fullPage: true });
  await page.goto(url + "/#/builders");
  await page.waitForSelector("#builders tr[data-builder]");

  step = "a delayed run is scheduled, not running";
  await page.goto(url + "/#/buildsets/" + process.env.KILN_SCHEDULED);
  await page.waitForSelector('#requests .badge[data-result="SCHEDULED"]');
  await page.waitForSelector('h1 .badge[data-result="QUEUED"]');
  await page.goto(url + "/#/buildsets");
  await page.waitForSelector(`#buildsets tr[data-bsid="${process.env.KILN_SCHEDULED}"] .badge[data-result="QUEUED"]`);
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

  step = "the builders page charts each builder's queue";
  await page.waitForSelector("#queues");
  const queueBars = await page.$$eval("#queues rect", els => els.length);
  const builderCount = (await (await fetch(`${url}/api/v2/builders`)).json()).meta.total;
  if (queueBars !== Math.min(50, builderCount)) fail(`${queueBars} queue bars for ${builderCount} builders`);

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
