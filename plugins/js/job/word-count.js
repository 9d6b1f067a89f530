// Kiln's example job in JavaScript: uses the whole host interface.
//
// It reads its args, kwargs and a buildset property, logs at three levels, reports
// nested progress, sets a property, writes an artifact into its result directory and
// returns a JSON value: exactly what the Python and C examples do.
import host from "kiln:plugin/host@0.1.0";
import preopens from "wasi:filesystem/preopens@0.2.12";

// UTF-8 bytes of a string (QuickJS has no TextEncoder).
function utf8(text) {
  const bytes = [];
  for (const ch of text) {
    let c = ch.codePointAt(0);
    if (c < 0x80) bytes.push(c);
    else if (c < 0x800) bytes.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) bytes.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else bytes.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return new Uint8Array(bytes);
}

// Writes a file into a directory the sandbox granted (here the build's /results).
function writeFile(dir, name, text) {
  const root = preopens.getDirectories().find(([, path]) => path === dir);
  if (!root) throw { message: `no ${dir} directory in the sandbox`, details: null };
  const file = root[0].openAt({ symlinkFollow: false }, name, { create: true, truncate: true }, { write: true });
  file.write(utf8(text), 0);
}

export function run(ctx) {
  const args = JSON.parse(ctx.args);
  const kwargs = JSON.parse(ctx.kwargs) ?? {};
  const words = kwargs.words ?? [];

  host.log("debug", "args: " + JSON.stringify(args));
  host.log("info", `hello from javascript, ${ctx.builder} #${ctx.number}`);
  host.log("warning", `${words.length} words to count`);

  words.forEach((word, i) => host.progress(["count", "words"], i + 1, words.length, word));
  host.progress(["count"], 1, 1, "counted");
  host.setState("counted");
  host.setProperty("word_count", JSON.stringify(words.length), "javascript");

  writeFile("/results", "words.txt", words.map(w => w + "\n").join(""));

  const greeting = host.getProperty("greeting");
  return {
    code: "success",
    returnValue: JSON.stringify({
      language: "javascript",
      words: words.length,
      greeting: greeting ? JSON.parse(greeting.value) : null,
      args,
      properties: ctx.properties.length,
    }),
  };
}
