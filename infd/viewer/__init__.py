"""`infd serve`: an infinite-zoom web viewer of neural-field images.

    service.py   latents by id, feature maps decoded once, tiles batched (no web framework,
                 so benchmarks and GPU machines without fastapi can drive it in-process)
    app.py       the FastAPI app: Deep Zoom descriptors and tiles, views, the page
    static/      the page (index.html, viewer.js, viewer.css) and the vendored OpenSeadragon
"""
