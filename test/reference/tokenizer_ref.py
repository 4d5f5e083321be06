"""Reference fixtures for plugins/clip/tokenizer.ts.

Usage: python test/reference/tokenizer_ref.py OUTDIR

Builds real-vocabulary CLIP tokenizer folders without hub access (the original OpenAI BPE
merges ship inside the `open_clip_torch` wheel) and records the ids that transformers'
CLIPTokenizer produces for a few hundred strings. Written to OUTDIR:

  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
      diffusers SD1.5 `tokenizer/` layout (pad "<|endoftext|>", model_max_length 77)
  clip-vit-base-patch16/
      hub openai/clip-vit-base-patch16 layout, reduced to tokenizer.json + configs
  sd2/
      SD2-style layout whose pad token is "!"
  tiny/
      the byte-level tokenizer that ClipTokenizer.byteLevel() embeds
  cases.json
      strings, expected unpadded ids and expected 77-padded/truncated batches per layout

Needs open_clip_torch==3.3.0 (install with --no-deps: only its data file is read, the package
is never imported) and transformers==5.23.0 / tokenizers 0.23.x.
"""

import gzip
import importlib.util
import json
import os
import shutil
import sys
import unicodedata

from common import (
    EOT,
    MAX_LENGTH,
    SOT,
    TINY_MERGES,
    added_token,
    bpe_vocab,
    write_json,
    write_sd_layout,
    write_vocab_merges,
)

OPEN_CLIP_PIN = "open_clip_torch==3.3.0"


def openai_merges():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        sys.exit(
            "tokenizer_ref.py: the CLIP BPE merges come from the open_clip_torch wheel; install it "
            f"with `pip install --no-deps {OPEN_CLIP_PIN}`"
        )
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    # Exactly the slice OpenAI's SimpleTokenizer uses: header dropped, 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894, len(merges)
    return merges


def write_hub_b16_layout(folder, vocab, merges):
    # The hub repo also ships vocab.json/merges.txt; they are left out so that the
    # tokenizer.json-only path is what gets exercised.
    os.makedirs(folder, exist_ok=True)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[t],
                "special": True,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": True,
            }
            for t in (SOT, EOT)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {
                        "Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d"
                        "|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"
                    },
                    "behavior": "Removed",
                    "invert": True,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
            ],
        },
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [EOT, vocab[EOT]],
            "cls": [SOT, vocab[SOT]],
            "trim_offsets": False,
            "add_prefix_space": False,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": EOT,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    config = {
        "unk_token": added_token(EOT, True),
        "bos_token": added_token(SOT, True),
        "eos_token": added_token(EOT, True),
        "pad_token": EOT,
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "name_or_path": "openai/clip-vit-base-patch16",
        "model_max_length": MAX_LENGTH,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    special = {
        "bos_token": added_token(SOT, False),
        "eos_token": added_token(EOT, False),
        "unk_token": added_token(EOT, False),
        "pad_token": EOT,
    }
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    write_json(os.path.join(folder, "special_tokens_map.json"), special)


# ---------------------------------------------------------------------------------------------
# Test strings

AIRCRAFT = """707-320 727-200 737-200 737-300 737-400 737-500 737-600 737-700 737-800 737-900
747-100 747-200 747-300 747-400 757-200 757-300 767-200 767-300 767-400 777-200 777-300 A300B4
A310 A318 A319 A320 A321 A330-200 A330-300 A340-200 A340-300 A340-500 A340-600 A380 ATR-42
ATR-72 An-12 BAE-125 C-130 C-47 CRJ-200 CRJ-700 CRJ-900 DC-10 DC-3 DC-6 DC-8 DC-9-30 DH-82
DHC-1 DHC-6 DHC-8-100 DHC-8-300 DR-400 E-170 E-190 E-195 EMB-120 F-16A/B F/A-18 Hawk-T1 Il-76
L-1011 MD-11 MD-80 MD-87 MD-90 PA-28 SR-20 Tu-134 Tu-154 Yak-42""".split() + [
    "BAE 146-200",
    "BAE 146-300",
    "Beechcraft 1900",
    "Boeing 717",
    "Boeing 737-800",
    "Cessna 172",
    "Cessna 208",
    "Cessna 525",
    "Cessna 560",
    "Challenger 600",
    "Dornier 328",
    "ERJ 135",
    "ERJ 145",
    "Embraer Legacy 600",
    "Eurofighter Typhoon",
    "Falcon 2000",
    "Falcon 900",
    "Fokker 100",
    "Fokker 50",
    "Fokker 70",
    "Global Express",
    "Gulfstream IV",
    "Gulfstream V",
    "Metroliner",
    "Model B200",
    "Saab 2000",
    "Saab 340",
    "Spitfire",
    "Tornado",
]

FOOD = """apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap
bread_pudding breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche
cheesecake cheese_plate chicken_curry chicken_quesadilla chicken_wings chocolate_cake
chocolate_mousse churros clam_chowder club_sandwich crab_cakes creme_brulee croque_madame
cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots falafel filet_mignon
fish_and_chips foie_gras french_fries french_onion_soup french_toast fried_calamari fried_rice
frozen_yogurt garlic_bread gnocchi greek_salad grilled_cheese_sandwich hot_and_sour_soup
huevos_rancheros macarons miso_soup pad_thai pho poutine takoyaki tiramisu""".split() + [
    "crème brûlée",
    "pad thai",
    "Crème Brûlée",
    "pho",
    "crêpes suzette",
    "jalapeño poppers",
    "açaí bowl",
    "smörgåsbord",
]

PETS = """Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman
Bombay boxer British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter
german_shorthaired great_pyrenees havanese japanese_chin keeshond leonberger Maine_Coon
miniature_pinscher newfoundland Persian pomeranian pug Ragdoll Russian_Blue saint_bernard samoyed
scottish_terrier shiba_inu Siamese Sphynx staffordshire_bull_terrier wheaten_terrier
yorkshire_terrier""".split()

FLOWERS = [
    s.strip()
    for s in """pink primrose|hard-leaved pocket orchid|canterbury bells|sweet pea|english marigold|
tiger lily|moon orchid|bird of paradise|monkshood|globe thistle|snapdragon|colt's foot|king protea|
spear thistle|yellow iris|globe-flower|purple coneflower|peruvian lily|balloon flower|
giant white arum lily|fire lily|pincushion flower|fritillary|red ginger|grape hyacinth|corn poppy|
prince of wales feathers|stemless gentian|artichoke|sweet william|carnation|garden phlox|
love in the mist|mexican aster|alpine sea holly|ruby-lipped cattleya|cape flower|great masterwort|
siam tulip|lenten rose|barbeton daisy|daffodil|sword lily|poinsettia|bolero deep blue|wallflower|
marigold|buttercup|oxeye daisy|common dandelion|petunia|wild pansy|primula|sunflower|pelargonium|
bishop of llandaff|gaura|geranium|orange dahlia|pink-yellow dahlia?|cautleya spicata|
japanese anemone|black-eyed susan|silverbush|californian poppy|osteospermum|spring crocus|
bearded iris|windflower|tree poppy|gazania|azalea|water lily|rose|thorn apple|morning glory|
passion flower|lotus|toad lily|anthurium|frangipani|clematis|hibiscus|columbine|desert-rose|
tree mallow|magnolia|cyclamen|watercress|canna lily|hippeastrum|bee balm|ball moss|foxglove|
bougainvillea|camellia|mallow|mexican petunia|bromelia|blanket flower|trumpet creeper|
blackberry lily""".split("|")
]

CARS = [
    "2012 BMW M3 coupe",
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Aston Martin V8 Vantage Convertible 2012",
    "Audi S4 Sedan 2007",
    "BMW 1 Series Convertible 2012",
    "Bentley Continental GT Coupe 2007",
    "Bugatti Veyron 16.4 Coupe 2009",
    "Chevrolet Corvette ZR1 2012",
    "Chevrolet Silverado 1500 Hybrid Crew Cab 2012",
    "Dodge Ram Pickup 3500 Crew Cab 2010",
    "FIAT 500 Abarth 2012",
    "Ferrari 458 Italia Convertible 2012",
    "Ford F-150 Regular Cab 2012",
    "GMC Savana Van 2012",
    "Hyundai Veloster Hatchback 2012",
    "Jeep Grand Cherokee SUV 2012",
    "Lamborghini Gallardo LP 570-4 Superleggera 2012",
    "Mercedes-Benz SL-Class Coupe 2009",
    "Mercedes-Benz Sprinter Van 2012",
    "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
    "smart fortwo Convertible 2012",
    "Volkswagen Golf Hatchback 1991",
    "Volvo C30 Hatchback 2012",
    "McLaren MP4-12C Coupe 2012",
    "Eagle Talon Hatchback 1998",
]

DTD = """banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline
dotted fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike
lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous potholed scaly
smeared spiralled sprinkled stained stratified striped studded swirly veined waffled woven
wrinkled zigzagged""".split()

SUN397 = """/a/abbey /a/airplane_cabin /a/airport_terminal /a/alley /a/amphitheater
/a/amusement_arcade /a/apartment_building/outdoor /a/apse/indoor /a/aquarium /a/arch
/b/bakery/shop /b/bistro/indoor /c/car_interior/frontseat /f/fire_escape /m/music_studio
/s/ski_slope /t/toll_plaza /y/youth_hostel""".split()

EUROSAT = [
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
]

OTHER_CLASSES = [
    "Apply_Eye_Makeup",
    "Yo_Yo",
    "Faces_easy",
    "yin_yang",
    "Leopards",
    "BACKGROUND_Google",
]

EDGE = [
    "",
    " ",
    "   \t\n ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "  leading and trailing  ",
    "multiple   spaces\tand\t\ttabs\nand\n\nnewlines\r\nCRLF",
    "it's",
    "don't",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S DON'T THEY'RE",
    "'s",
    "''s",
    "'''",
    "rock'n'roll",
    "O'Neill's",
    "dogs' toys",
    "`backtick`",
    "\u201ccurly quotes\u201d and \u2018single\u2019",
    "it\u2019s a curly apostrophe",
    "&amp; &lt;b&gt; &quot;x&quot; &#39; &nbsp;",
    "Tom &amp; Jerry",
    "<b>bold</b> <i>and</i> <br/>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|STARTOFTEXT|>",
    "<|ENDOFTEXT|>",
    "<|EndOfText|> and <|StartOfText|>",
    "a<|endoftext|>b",
    "<|endoftext|><|endoftext|>",
    "<|startoftext|>a photo<|endoftext|>",
    "A Photo <|ENDOFTEXT|> of a CAT",
    "<|endoftext",
    "|endoftext|>",
    "<|end oftext|>",
    "<||>",
    "12345",
    "3.14159",
    "1,000,000",
    "2024-01-01",
    "x2 v1.5 sd-1.5",
    "\u00bd \u00be \u00b2 \u00b3 \u2460",
    "\u0663\u0664 arabic-indic digits",
    "\u216b roman numeral",
    "!!!???...",
    "...",
    "--",
    "\u2014em dash\u2013en dash",
    "#hashtag @mention",
    "email@example.com",
    "https://example.com/path?q=1&r=2",
    "C++ and C#",
    "100%",
    "$5.99",
    "\u20ac10 \u00a320 \u00a530",
    "na\u00efve caf\u00e9 r\u00e9sum\u00e9",
    "caf\u00e9",
    "cafe\u0301",
    "cre\u0300me bru\u0302le\u0301e",
    "\u212bngstr\u00f6m",
    "\u00c5ngstr\u00f6m",
    "A\u030angstro\u0308m",
    "\ufb01 ligature",
    "Stra\u00dfe",
    "\u1e9e capital sharp s",
    "\u0130stanbul",
    "\u039f\u0394\u039f\u03a3",
    "\u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2 \u03a3\u0399\u03a3\u03a5\u03a6\u039f\u03a3",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\u041c\u043e\u0441\u043a\u0432\u0430",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5",
    "\ud55c\uad6d\uc5b4",
    "\u0e44\u0e17\u0e22",
    "\u05e2\u05d1\u05e8\u05d9\u05ea",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\u0939\u093f\u0928\u094d\u0926\u0940",
    "\U0001f431 cat emoji",
    "\U0001f431\U0001f436\U0001f42d\U0001f439\U0001f430\U0001f98a\U0001f43b\U0001f43c\U0001f428",
    "\u65e5\u672c\u8a9e\u306e\u9577\u3044\u6587\u7ae0\u306f"
    "\u30b9\u30da\u30fc\u30b9\u306a\u3057\u3067\u7d9a\u304d\u307e\u3059",
    "=" * 50,
    "-_" * 30,
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f1fa\U0001f1f8 flag",
    "\u2764\ufe0f",
    "emoji\U0001f642glued",
    "a\u0301",
    "e\u0300\u0301",
    "\u0301 leading combining",
    "zero\u200bwidth",
    "nbsp\u00a0here",
    "nel\u0085here",
    "bom\ufeffhere",
    "ideographic\u3000space",
    "line\u2028sep",
    "tab\x0bvt\x0cff",
    "control\x01\x02chars",
    "null\x00byte",
    "\U0010ffff",
    "\u01c5 \u01c4 \u01c6 titlecase",
    "\u212a kelvin \u2126 ohm",
    "\ua7ce\U00016ea0 unicode 17 capitals",
    "\u13f8 cherokee",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "hahahahahahahaha",
    "a photo of a cat a photo of a cat",
    "masterpiece, best quality, (high detail:1.2), 8k uhd",
    "a painting of a fox in the style of van gogh, trending on artstation",
]


def long_strings():
    out = []
    for n in (74, 75, 76, 77, 78, 100):
        out.append(" ".join(["a"] * n))
    out.append("a photo of " * 30)
    out.append("1234567890" * 10)
    out.append("x " * 80 + "<|endoftext|>")
    out.append(" ".join(f"word{i}" for i in range(60)))
    # One long pseudo-random word, deterministic.
    seed = 12345
    letters = []
    for _ in range(600):
        seed = (seed * 1103515245 + 12345) % (2**31)
        letters.append("abcdefghijklmnopqrstuvwxyz"[seed % 26])
    out.append("".join(letters))
    out.append(
        "A highly detailed photograph of an old Boeing 737-800 aircraft parked at a busy airport "
        "terminal at sunset, with ground crew, baggage carts, fuel trucks, reflections on the wet "
        "tarmac, dramatic clouds, golden hour lighting, shot on a 50mm lens, f/1.8, bokeh, "
        "award-winning, ultra realistic, 8k resolution, National Geographic style"
    )
    return out


def templated():
    out = []
    for c in AIRCRAFT[:40]:
        out.append(f"A photo of a {c} aircraft")
    for c in AIRCRAFT[40:60]:
        out.append(f"a photo of a {c}, a type of aircraft.")
    for c in EUROSAT:
        out.append(f"A satellite photo of a {c}")
    for c in PETS[:20]:
        out.append(f"a pet photo of a {c}")
    for c in PETS[20:]:
        out.append(f"a photo of a {c.replace('_', ' ')}, a type of pet.")
    for c in FOOD[:20]:
        out.append(f"a photo of {c.replace('_', ' ')}, a type of food.")
    for c in FLOWERS[:20]:
        out.append(f"a photo of a {c}, a type of flower.")
    for c in DTD[:10]:
        out.append(f"{c} texture.")
    for c in CARS[:10]:
        out.append(f"a photo of a {c}.")
    for c in SUN397[:6]:
        out.append(f"a photo of a {c}.")
    return out


# Code points where tokenizers' Unicode tables (normalisation, lowercase) are older than those
# of the ICU inside V8; plugins/clip/tokenizer.ts carries the corrections, these strings pin them.
NFC_OLD_STARTERS = [
    0x7FD, 0x897, 0x89F, 0x8CA, 0x8D3, 0x9FE, 0xC3C, 0xD3B, 0xD3C, 0xEBA, 0x1715, 0x1ABF, 0x1ACE,
    0x1DF6, 0x1DFA, 0xA82C, 0x10D24, 0x10D69, 0x10EAB, 0x10EFD, 0x10F46, 0x10F82, 0x11070,
    0x1133B, 0x113CE, 0x1145E, 0x11839, 0x1193D, 0x11943, 0x119E0, 0x11A34, 0x11A47, 0x11A99,
    0x11D42, 0x11D97, 0x11F41, 0x1612F, 0x16FF0, 0x1E08F, 0x1E130, 0x1E2AE, 0x1E2EC, 0x1E4EC,
    0x1E5EE,
]
NFC_OPAQUE = [
    0x105C9, 0x105D2, 0x105DA, 0x105E4, 0x11382, 0x11383, 0x11384, 0x11385, 0x1138B, 0x1138E,
    0x11390, 0x11391, 0x113C2, 0x113C5, 0x113C7, 0x113C8, 0x11935, 0x11938, 0x1611E, 0x16121,
    0x16124, 0x16128, 0x16129, 0x16D63, 0x16D67, 0x16D68, 0x16D6A, 0xF0000,
]
NFC_SECOND = [0x307, 0x113C9, 0x113BB, 0x113B8, 0x11930, 0x1611F, 0x16120]
COMMON_MARKS = [
    0x300, 0x301, 0x316, 0x345, 0x334, 0x94D, 0x5B0, 0x327, 0x308, 0x93C, 0x3099, 0x1133C,
    0x1133E, 0x11357,
]
BASES = [ord(c) for c in "aeAEoO kK\u3042\u304b\u03a3"]
BASES += [0xE0, 0xC5, 0x1E0B, 0x11347, 0x11099, 0x110BA]


def stress_strings(n=320):
    # Deterministic LCG so that the fixture is identical across Python versions.
    seed = 20240601
    pools = [NFC_OLD_STARTERS, NFC_OPAQUE, NFC_SECOND, COMMON_MARKS, BASES]

    def rnd(k):
        nonlocal seed
        seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64
        return (seed >> 33) % k

    out = []
    for _ in range(n):
        length = 1 + rnd(12)
        chosen = (pools[rnd(len(pools))] for _ in range(length))
        out.append("".join(chr(pool[rnd(len(pool))]) for pool in chosen))
    return out


SWEEP_BLOCK = 128


def sweep_starts():
    # Every block up to plane 3 and the tags/variation selectors of plane 14; the unassigned
    # planes 4-13 and the private-use planes only every 16th block.
    starts = []
    for start in range(0, 0x110000, SWEEP_BLOCK):
        dense = start < 0x40000 or 0xE0000 <= start < 0xE1000
        if dense or (start // SWEEP_BLOCK) % 16 == 0:
            starts.append(start)
    return starts


def sweep_string(start):
    # Mirrored in test/tokenizer_test.ts: every code point after a letter, after U+0345 (the
    # highest combining class), before a digit and before punctuation.
    cps = [c for c in range(start, start + SWEEP_BLOCK) if not 0xD800 <= c <= 0xDFFF]
    return "".join(f"a{chr(c)}\u0345{chr(c)}1{chr(c)}! " for c in cps)


def fnv1a(ids):
    h = 0x811C9DC5
    for i in ids:
        for b in (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF, (i >> 24) & 0xFF):
            h ^= b
            h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def test_strings():
    strings = []
    seen = set()
    groups = [EDGE, AIRCRAFT, FOOD, PETS, FLOWERS, CARS, DTD, SUN397, EUROSAT, OTHER_CLASSES]
    groups += [templated(), long_strings(), stress_strings()]
    # NFD forms of every accented string, so that NFC normalisation is exercised widely.
    nfd = [unicodedata.normalize("NFD", s) for g in groups for s in g]
    for s in [s for g in groups for s in g] + nfd:
        if s not in seen:
            seen.add(s)
            strings.append(s)
    return strings


# ---------------------------------------------------------------------------------------------


def expectations(tok, strings, max_length):
    ids = [tok(s).input_ids for s in strings]
    batch = tok(strings, padding="max_length", truncation=True, max_length=max_length)
    for row in batch.input_ids:
        assert len(row) == max_length
    return {
        "ids": ids,
        "batch": {
            "maxLength": max_length,
            "ids": batch.input_ids,
            "attentionMask": batch.attention_mask,
        },
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python test/reference/tokenizer_ref.py OUTDIR")
    out = sys.argv[1]
    import tokenizers
    import transformers
    from transformers import AutoTokenizer, CLIPTokenizer
    from transformers.utils import logging

    # Over-long prompts are part of the fixture; the "longer than 77" warnings are noise.
    logging.set_verbosity_error()

    merges = openai_merges()
    vocab = bpe_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    assert vocab[SOT] == 49406 and vocab[EOT] == 49407

    os.makedirs(out, exist_ok=True)
    for sub in ("clip-vit-base-patch16", "sd2", "tiny"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    write_sd_layout(out, vocab, merges, EOT)
    write_sd_layout(os.path.join(out, "sd2"), vocab, merges, "!")
    write_hub_b16_layout(os.path.join(out, "clip-vit-base-patch16"), vocab, merges)
    tiny_vocab = bpe_vocab(TINY_MERGES)
    write_vocab_merges(os.path.join(out, "tiny"), tiny_vocab, TINY_MERGES)

    sd = AutoTokenizer.from_pretrained(out)
    b16 = AutoTokenizer.from_pretrained(os.path.join(out, "clip-vit-base-patch16"))
    sd2 = AutoTokenizer.from_pretrained(os.path.join(out, "sd2"))
    # A bare vocab/merges folder names no tokenizer class, so AutoTokenizer cannot resolve it.
    tiny = CLIPTokenizer.from_pretrained(os.path.join(out, "tiny"))
    for t in (sd, b16, sd2, tiny):
        assert type(t) is CLIPTokenizer and t.is_fast, type(t)

    known = [49406, 320, 1125, 539, 320, 2368, 49407]
    for t in (sd, b16, sd2):
        got = t("a photo of a cat").input_ids
        assert got == known, got
        assert t.model_max_length == MAX_LENGTH
        assert len(t) == 49408
    assert sd.pad_token_id == 49407 and b16.pad_token_id == 49407 and sd2.pad_token_id == 0

    strings = test_strings()
    assert len(strings) >= 400, len(strings)
    cases = {
        "generator": {
            "script": "test/reference/tokenizer_ref.py",
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "bpe": OPEN_CLIP_PIN + ":open_clip/bpe_simple_vocab_16e6.txt.gz",
        },
        "strings": strings,
        "layouts": {
            "sd15": {
                "folder": ".",
                "padId": sd.pad_token_id,
                **expectations(sd, strings, MAX_LENGTH),
            },
            "clip-vit-base-patch16": {
                "folder": "clip-vit-base-patch16",
                "padId": b16.pad_token_id,
                **expectations(b16, strings, MAX_LENGTH),
            },
            "sd2": {
                "folder": "sd2",
                "padId": sd2.pad_token_id,
                **expectations(sd2, strings, MAX_LENGTH),
            },
            "tiny": {
                "folder": "tiny",
                "padId": tiny.pad_token_id,
                "vocabSize": len(tiny),
                **expectations(tiny, strings, MAX_LENGTH),
            },
        },
    }
    starts = sweep_starts()
    cases["sweep"] = {
        "layout": "sd15",
        "block": SWEEP_BLOCK,
        "starts": starts,
        "fnv1a": [fnv1a(ids) for ids in sd([sweep_string(s) for s in starts]).input_ids],
    }
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    layouts = len(cases["layouts"])
    print(f"tokenizer_ref.py: wrote {len(strings)} strings x {layouts} layouts to {out}")


if __name__ == "__main__":
    main()
