"""The one error type of the converters: always names the folder, key or shape that was wrong."""


class ConvertError(ValueError):
  """A Hugging Face checkpoint cannot be converted; the message names what was wrong."""
