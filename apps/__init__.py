"""Apps built on the runtime, imported as ``nvila_edge.apps``: the OpenAI-compatible server (``server``,
``server_cli``: ``nvila-edge serve``), the robot ``Agent`` (``agent``), the camera source and app (``camera``,
``camera_app``: ``nvila-edge camera``) and video QA (``video_qa``). An app imports the core and the runtime only."""
