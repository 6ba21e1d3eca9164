"""Special token ids shared by every SentencePiece model we train or accept."""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
