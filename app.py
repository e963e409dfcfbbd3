"""The vlora workbench: `python app.py` on localhost, or a Hugging Face Space (app_file: app.py)."""

from ui.layout import build_app, launch_options

demo = build_app()

if __name__ == "__main__":
    demo.launch(**launch_options())  # no host or port: localhost here, the Space's own on a Space
