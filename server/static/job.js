// The job page: fills in from the job's server-sent events (status, progress, image, message)
// and lists the images the job wrote before the page was opened. Cancel calls the API's DELETE.
const main = document.getElementById("job");
const id = main.dataset.job;
const api = `/v1/jobs/${id}`;
const images = document.getElementById("images");
const logList = document.getElementById("log");
const progress = document.getElementById("progress");
const count = document.getElementById("count");
const step = document.getElementById("step");
const statusText = document.getElementById("status");
const cancel = document.getElementById("cancel");
const connection = document.getElementById("connection");
const FINAL = ["cancelled", "succeeded", "failed"];
const shown = new Set();

function log(text, kind = "message") {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  logList.append(li);
}

/** Adds an image once, keeping the grid in file order. */
function addImage(file) {
  if (shown.has(file)) return;
  shown.add(file);
  const figure = document.createElement("figure");
  figure.dataset.file = file;
  const img = document.createElement("img");
  img.alt = file;
  img.src = `/jobs/${id}/files/${file.split("/").map(encodeURIComponent).join("/")}`;
  const caption = document.createElement("figcaption");
  caption.textContent = file;
  figure.append(img, caption);
  const after = [...images.children].find((f) => f.dataset.file > file);
  images.insertBefore(figure, after ?? null);
  images.dataset.count = String(shown.size);
}

function showProgress(p) {
  progress.max = p.total ?? 1;
  progress.value = p.total === null ? 0 : p.done;
  count.textContent = `${p.done} / ${p.total ?? "?"}`;
  main.dataset.done = String(p.done);
  step.textContent = p.step ? `step ${p.step.index + 1} of ${p.step.total}` : "";
}

function showStatus(view) {
  main.dataset.status = view.status;
  statusText.textContent = view.status;
  showProgress(view.progress);
  const final = FINAL.includes(view.status);
  cancel.disabled = final || view.status === "cancelling";
  if (final && view.error && main.dataset.final !== "true") log(view.error, "error");
  if (final) main.dataset.final = "true";
}

let first = true;
const events = new EventSource(`${api}/events`);
events.addEventListener("status", (e) => {
  const view = JSON.parse(e.data);
  if (first) {
    first = false;
    connection.textContent = "";
    for (const m of view.messages) log(m);
    // Listed once the stream is open: an image written meanwhile comes as an event too.
    fetch(`/jobs/${id}/images`).then((r) => r.json()).then((r) => {
      for (const f of r.files) addImage(f);
      main.dataset.listed = "true";
    }, (err) => log(`could not list the images: ${err}`, "error"));
  }
  showStatus(view);
});
events.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
events.addEventListener("image", (e) => addImage(JSON.parse(e.data).file));
events.addEventListener("message", (e) => log(JSON.parse(e.data).message));
events.addEventListener("end", (e) => {
  events.close();
  showStatus(JSON.parse(e.data));
  connection.textContent = "finished";
});
events.addEventListener("error", () => {
  if (events.readyState !== EventSource.CLOSED) connection.textContent = "reconnecting...";
});

cancel.addEventListener("click", async () => {
  cancel.disabled = true;
  const res = await fetch(api, { method: "DELETE" });
  if (!res.ok) {
    const body = await res.json().catch(() => null);
    log(`cancel: ${body?.error?.message ?? res.statusText}`, "error");
  }
});
