"""Words of the small tokenizers that test builds construct offline (no tokenizer can be downloaded here).

One list for every tiny tokenizer in the project (GroundingDINO's BERT-style, FLUX's CLIP and T5, the trainer's
UMT5 stand-in): caption, attribute, object and background words of the fixtures and sample videos, so the
test builds tokenise them into real word ids instead of <unk>. The tokenizers themselves are built here too,
so every test build of a CLIP-family model (FLUX, CLIP, OWLv2, X-CLIP) shares one.
"""

TINY_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "and",
    "with",
    "in",
    "on",
    "at",
    "of",
    "to",
    "is",
    "are",
    "his",
    "her",
    "their",
    "while",
    "left",
    "right",
    "front",
    "back",
    "next",
    "near",
    "behind",
    "standing",
    "sitting",
    "walking",
    "talking",
    "smiling",
    "holding",
    "looking",
    "cooking",
    "dancing",
    "running",
    "reading",
    "playing",
    "wearing",
    "man",
    "woman",
    "boy",
    "girl",
    "person",
    "child",
    "old",
    "young",
    "people",
    "two",
    "three",
    "they",
    "he",
    "she",
    "shirt",
    "jacket",
    "dress",
    "hat",
    "cap",
    "glasses",
    "watch",
    "scarf",
    "coat",
    "skirt",
    "jeans",
    "shoes",
    "bag",
    "hair",
    "beard",
    "tie",
    "suit",
    "sweater",
    "hoodie",
    "black",
    "white",
    "red",
    "blue",
    "green",
    "yellow",
    "brown",
    "gray",
    "grey",
    "pink",
    "purple",
    "orange",
    "dark",
    "light",
    "long",
    "short",
    "curly",
    "striped",
    "wooden",
    "metal",
    "leather",
    "denim",
    "cutting",
    "board",
    "table",
    "chair",
    "cup",
    "guitar",
    "book",
    "phone",
    "laptop",
    "bicycle",
    "car",
    "dog",
    "cat",
    "ball",
    "umbrella",
    "bottle",
    "kitchen",
    "garden",
    "street",
    "park",
    "room",
    "office",
    "beach",
    "forest",
    "city",
    "modern",
    "lush",
    "sunny",
    "cozy",
    "living",
    "bedroom",
    "cafe",
    "restaurant",
    "studio",
    "stage",
    "field",
    "river",
    "lake",
    "mountain",
    "snow",
    "night",
    "day",
    "background",
    "camera",
    "video",
    "scene",
    "slowly",
    "together",
    ",",
    ".",
    ";",
    ":",
    "-",
    "'",
    "!",
    "?",
    "t-shirt",
    "pants",
    "shorts",
    "sunglasses",
    "backpack",
    "no",
    "empty",
    "road",
    "sky",
    "bright",
    "indoor",
    "outdoor",
)

TINY_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789-")


def tiny_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer whose merges spell out each word of the list (others fall to
    letters)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for tok in TINY_LETTERS + [c + "</w>" for c in TINY_LETTERS] + [",</w>", ".</w>"]:
        vocab.setdefault(tok, len(vocab))
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        acc = pieces[0]
        for piece in pieces[1:]:
            merge = (acc, piece)
            acc += piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(acc, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_t5_tokenizer():
    """A Unigram T5 tokenizer over the word list plus single letters, so every prompt tokenizes."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), (",", -2.0), (".", -2.0)]
    pieces += [("▁" + w, -1.0) for w in TINY_WORDS] + [(c, -5.0) for c in TINY_LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)
