"""The model zoo. Importing this package registers every encoder, decoder and attention."""

from nmt.models import attention, multihead, rnn, transformer  # noqa: F401  (registration side effects)
from nmt.models.zoo import build_model  # noqa: F401
