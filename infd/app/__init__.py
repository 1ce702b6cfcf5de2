"""`infd app`: a web app over infd (Gradio, mounted beside the zoom viewers on one FastAPI server).

    workspace   the models and each tab's work (generate, explore, zoom video, reconstruct, layout), no web code
    ui          the Gradio page: tabs Generate, Explore, Reconstruct, Layout
    server      one FastAPI app: the page at /, each model's zoom viewer at /viewer/N/, the loopback Host check
    command     the `infd app` command
"""
