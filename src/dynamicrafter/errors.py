"""The library's own failures that name a setting.  Other expected failures are raised where they arise, each a
subclass of ValueError or OSError: ``ImageError`` (images), ``CheckpointError`` (checkpoint), ``UnknownModelError``
(presets), ``MissingWeightsError`` and ``DownloadError`` (hub), ``NonFiniteError`` (sampling), ``OutputError``
(files), ``ManifestError`` (batch)."""

from __future__ import annotations


class NamesSetting(Exception):
    """An error whose message names a setting: ``setting`` as the Python API spells it (``steps``, ``cfg_scale``,
    ``image_scale``, ``dtype``); the message reads with that name, and a front end shows its own name for it (a CLI
    flag) with :meth:`message_for`."""

    def __init__(self, setting: str, message: str) -> None:
        """``message`` holds ``{setting}`` where the setting's name goes."""
        self.setting, self.template = setting, message
        super().__init__(message.replace("{setting}", setting))

    def message_for(self, name: str) -> str:
        """The message with ``name`` for the setting (e.g. ``--lambda`` for ``image_scale``)."""
        return self.template.replace("{setting}", name)


class SettingsError(NamesSetting, ValueError):
    """A setting that cannot take the value it was given."""
