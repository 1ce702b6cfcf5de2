// The infd viewer: OpenSeadragon over the Deep Zoom tiles `infd serve` renders from z.
// The URL holds the latent and the view (?z=seed-42&view=x,y,w,h), so a link reproduces it.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const state = { info: null, latent: null, widthEdited: false };

  function say(text) { $("message").textContent = text || ""; }

  async function getJSON(url) {
    const response = await fetch(url);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `${url}: HTTP ${response.status}`);
    return body;
  }

  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "static/openseadragon/images/",
    showNavigationControl: false,
    drawer: "canvas",
    visibilityRatio: 0.2,
    minZoomImageRatio: 0.5,
    maxZoomPixelRatio: 2,
    imageLoaderLimit: 16,
    timeout: 120000,
    tileRetryMax: 5,  // a busy server answers 503: try again a moment later
    tileRetryDelay: 1000,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
  });
  window.infdViewer = viewer;  // for tests and the console

  function item() { return viewer.world.getItemAt(0); }

  // The visible part of the image, in image pixels, clamped to the image.
  function visibleRect() {
    const rect = item().viewportToImageRectangle(viewer.viewport.getBounds(true));
    const { width, height } = state.latent;
    const left = Math.max(0, rect.x), top = Math.max(0, rect.y);
    const right = Math.min(width, rect.x + rect.width), bottom = Math.min(height, rect.y + rect.height);
    return right > left && bottom > top ? { left, top, right, bottom } : null;
  }

  function fmt(n) { return Math.round(n).toLocaleString("en-US"); }

  function update() {
    if (!state.latent || !item()) return;
    const zoom = viewer.viewport.getZoom(true);
    const screenPerImagePixel = item().viewportToImageZoom(zoom);
    const fullWidth = state.latent.width * screenPerImagePixel, fullHeight = state.latent.height * screenPerImagePixel;
    const pixel = 2 / Math.max(fullWidth, fullHeight);
    const perFeature = Math.max(fullWidth, fullHeight) / Math.max(...state.info.feature_size);
    $("zoom-info").textContent =
      `zoom ×${(zoom / viewer.viewport.getHomeZoom()).toPrecision(3)} · image ${fmt(fullWidth)}×${fmt(fullHeight)} px · ` +
      `pixel ${pixel.toExponential(2)} of 2 · ${perFeature.toPrecision(3)} px per feature`;
    const rect = visibleRect();
    if (rect) {
      const dpr = window.devicePixelRatio || 1;
      const aspect = (rect.bottom - rect.top) / (rect.right - rect.left);
      if (!state.widthEdited) {
        $("view-width").value = Math.max(1, Math.round((rect.right - rect.left) * screenPerImagePixel * dpr));
      }
      $("view-height").value = Math.max(1, Math.round($("view-width").valueAsNumber * aspect));
    }
  }

  function linkToView() {
    const b = viewer.viewport.getBounds(true);
    const url = new URL(location.href);
    url.search = "";
    url.searchParams.set("z", state.latent.zid);
    url.searchParams.set("view", [b.x, b.y, b.width, b.height].map((v) => v.toPrecision(8)).join(","));
    return url.toString();
  }

  function remember() {
    if (!state.latent || !item()) return;
    const link = linkToView();
    history.replaceState(null, "", link);
    $("share-link").value = link;
  }

  async function show(zid, bounds) {
    say("");
    let latent;
    try {
      latent = await getJSON(`api/latents/${encodeURIComponent(zid)}`);
    } catch (error) {
      say(error.message);
      return;
    }
    state.latent = latent;
    document.body.dataset.zid = latent.zid;
    $("latent-label").textContent = latent.label === latent.zid ? latent.zid : `${latent.label} (${latent.zid})`;
    $("reproduce").textContent = latent.reproduce;
    $("z-file").href = `api/z/${latent.zid}.safetensors`;
    $("z-file").title = "download this z (render it with `infd render`)";
    if (latent.seed !== undefined) $("seed-input").value = latent.seed;
    viewer.addOnceHandler("open", () => {
      if (bounds) viewer.viewport.fitBounds(bounds, true);
      update();
      remember();
    });
    viewer.open(`dzi/${latent.zid}.dzi`);
  }

  function parseView(text) {
    const v = (text || "").split(",").map(Number);
    return v.length === 4 && v.every(Number.isFinite) && v[2] > 0 && v[3] > 0 ? new OpenSeadragon.Rect(...v) : null;
  }

  function randomSeed() {
    const value = new Uint32Array(1);
    crypto.getRandomValues(value);
    return value[0] % (state.info.max_seed + 1);
  }

  function download() {
    const rect = visibleRect();
    if (!rect) { say("the view shows no part of the image."); return; }
    const { width, height } = state.latent;
    const box = [-1 + 2 * rect.top / height, -1 + 2 * rect.left / width, -1 + 2 * rect.bottom / height, -1 + 2 * rect.right / width];
    const w = $("view-width").valueAsNumber, h = $("view-height").valueAsNumber;
    if (!(w >= 1 && h >= 1 && Number.isInteger(w) && Number.isInteger(h))) { say("the download size must be whole pixels."); return; }
    if (w * h > state.info.max_view_pixels) { say(`${w}×${h} is more than the ${fmt(state.info.max_view_pixels)} pixels a view may have.`); return; }
    const url = `api/view?z=${state.latent.zid}&box=${box.map((v) => v.toFixed(9)).join(",")}&size=${w}x${h}`;
    const link = document.createElement("a");
    link.href = url;
    link.download = `infd-${state.latent.zid}-${w}x${h}.png`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    say("");
  }

  viewer.addHandler("animation", update);
  viewer.addHandler("animation-finish", remember);
  viewer.addHandler("resize", update);
  viewer.addHandler("open-failed", (event) => say(`could not open the image: ${event.message || "error"}`));
  viewer.addHandler("tile-load-failed", (event) => say(`a tile failed to load (${event.message || "error"}); the server may be busy.`));

  $("zoom-in").onclick = () => viewer.viewport.zoomBy(2);
  $("zoom-out").onclick = () => viewer.viewport.zoomBy(0.5);
  $("home").onclick = () => viewer.viewport.goHome();
  $("full-page").onclick = () => viewer.setFullScreen(!viewer.isFullPage());
  $("download").onclick = download;
  $("view-width").oninput = () => { state.widthEdited = true; update(); };
  $("view-height").oninput = () => {
    const rect = visibleRect();
    if (!rect) return;
    state.widthEdited = true;
    const aspect = (rect.bottom - rect.top) / (rect.right - rect.left);
    $("view-width").value = Math.max(1, Math.round($("view-height").valueAsNumber / aspect));
  };
  $("share").onclick = async () => {
    remember();
    try {
      await navigator.clipboard.writeText($("share-link").value);
      say("");
    } catch (error) {
      $("share-link").select();  // no clipboard access (plain http): the link is selected to copy by hand
    }
  };

  (async function start() {
    try {
      state.info = await getJSON("api/info");
    } catch (error) {
      say(`the server did not answer: ${error.message}`);
      return;
    }
    for (const id of ["new-sample", "seed-input", "seed-go"]) {
      $(id).disabled = !state.info.can_sample;
      if (!state.info.can_sample) $(id).title = state.info.sample_message;
    }
    if (!state.info.can_sample) $("new-sample").insertAdjacentHTML("afterend", '<span class="small">(autoencoder only: no new samples)</span>');
    $("new-sample").onclick = () => show(`seed-${randomSeed()}`);
    $("seed-go").onclick = () => {
      const seed = $("seed-input").valueAsNumber;
      if (Number.isInteger(seed) && seed >= 0 && seed <= state.info.max_seed) show(`seed-${seed}`);
      else say(`a seed is a whole number from 0 to ${state.info.max_seed}.`);
    };
    const params = new URLSearchParams(location.search);
    await show(params.get("z") || state.info.first, parseView(params.get("view")));
  })();
})();
