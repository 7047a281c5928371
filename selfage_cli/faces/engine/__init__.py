"""The face engine: image loading, detection, FFHQ alignment, identity descriptors and paste-back.

Images and arrays in and out; nothing here reads or writes a project (the ``align`` stage,
``selfage_cli.faces.stage``, does). See docs/architecture.md.
"""
