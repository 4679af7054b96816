"""Synthetic simple-English children's stories: an offline stand-in corpus, NOT TinyStories.

TinyStories (short stories in simple English) cannot be downloaded on the machines this project is
developed and tested on, so the language-model recipes default to this corpus instead. It is made
here, from word lists and sentence templates written for this project, and every place that shows it
labels it with :data:`STAND_IN_LABEL`. Results on it say nothing about TinyStories itself.

The word lists and templates are data: ``story_corpus_words.json`` next to this module holds them
(its ``_comment`` key says what each list is), and importing this module loads them once, in file
order, into :data:`GIRL_NAMES`, :data:`FAMILY`, ... (tuples) and :data:`TEMPLATES` (a dict of tuples).

What it is built to have, because a model-collapse study needs it:

* **A small plot per story** (setup, problem, one or more attempts, resolution, an ending or moral),
  told in the past tense with dialogue in quotes. The cast, place, object and food are fixed at the
  start of a story and recur in it, so a model can lower its loss by tracking them over long ranges.
* **Syntactic variety.** Sentences are drawn from a few hundred templates with slots; a story is
  60 to 250 words long and most of a corpus's stories are distinct.
* **Heavy-tailed word frequencies.** Every slot is filled from a long word list ordered from common
  to rare, with Zipfian weights ``p(rank) ~ 1 / rank**zipf_a``. A few words dominate and hundreds
  are rare (each in well under 1% of stories). Those rare words are what a collapsing model loses
  first, and :func:`rare_words`, :func:`word_frequencies` and :func:`vocabulary_coverage` measure it.
* **Determinism and prefix stability.** Story ``i`` of seed ``s`` comes from its own random stream,
  ``np.random.default_rng([s, i])``, so ``generate_stories(k, s)`` is exactly the first ``k`` stories
  of ``generate_stories(n, s)`` for every ``k <= n``: a corpus can be capped or extended without
  changing the stories it already had.

Stories are plain ASCII, one line each, words separated by single spaces. :func:`write_corpus`
writes the TinyStories text-file format (each story followed by a line ``<|endoftext|>``), so the
same loader reads this corpus and real TinyStories ``.txt`` files; :func:`read_corpus` reads it back.

NumPy and the standard library only: data code must not need torch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from collapse.atomic import atomic_open

STAND_IN_LABEL = "synthetic simple-English stories (offline stand-in, not TinyStories)"
"""How every report, log and figure names this corpus: it must never pass for TinyStories."""

EOT_SEPARATOR = "<|endoftext|>"
"""The line that ends each story in the TinyStories ``.txt`` format."""

MIN_WORDS = 60
"""Fewest whitespace-separated words in a story."""

MAX_WORDS = 250
"""Most whitespace-separated words in a story."""

DEFAULT_ZIPF_A = 1.1
"""Default Zipf exponent of the slot fillers: ``p(rank) ~ 1 / rank**a``, as in natural text."""

# Uniform numbers drawn per refill of a story's stream. One vectorised draw is much cheaper than one
# generator call per choice; a typical story needs 100-200, and a refill continues the same stream,
# so a long story stays deterministic.
_BATCH = 256


# ----------------------------------------------------------------------------------------------------
# Word lists and sentence templates. They are data, kept in story_corpus_words.json next to this module
# (its "_comment" key names the fields of each list of rows). The ORDER of every list is its Zipf rank:
# common, simple words first, rare ones last.
# ----------------------------------------------------------------------------------------------------

_WORDS_FILE = Path(__file__).with_name("story_corpus_words.json")


def _load_words(path: Path) -> dict:
    """The word lists and template groups of ``path`` in file order, as tuples (a row is a tuple of str).

    Keys starting with ``_`` are comments. An empty list, or one that repeats an entry, is refused: an
    empty one cannot be drawn from, and a repeated entry would silently hold two Zipf ranks.
    """
    data = json.loads(path.read_text(encoding="utf-8"))

    def entries(name: str, value: list) -> tuple:
        out = tuple(tuple(x) if isinstance(x, list) else x for x in value)
        if not out or len(set(out)) != len(out):
            raise ValueError(f"{path.name}: {name} is empty or repeats an entry")
        return out

    words: dict = {}
    for name, value in data.items():
        if name.startswith("_"):
            continue
        if isinstance(value, dict):  # TEMPLATES: template groups by name
            words[name] = {key: entries(f"{name}[{key!r}]", group) for key, group in value.items()}
        else:
            words[name] = entries(name, value)
    return words


_WORDS = _load_words(_WORDS_FILE)

GIRL_NAMES: tuple[str, ...] = _WORDS["GIRL_NAMES"]
BOY_NAMES: tuple[str, ...] = _WORDS["BOY_NAMES"]
PET_NAMES: tuple[str, ...] = _WORDS["PET_NAMES"]
ANIMALS: tuple[str, ...] = _WORDS["ANIMALS"]
CHARACTER_ADJECTIVES: tuple[str, ...] = _WORDS["CHARACTER_ADJECTIVES"]
FAMILY: tuple[tuple[str, ...], ...] = _WORDS["FAMILY"]
PLACES: tuple[str, ...] = _WORDS["PLACES"]
OBJECTS: tuple[str, ...] = _WORDS["OBJECTS"]
FOODS: tuple[str, ...] = _WORDS["FOODS"]
COLORS: tuple[str, ...] = _WORDS["COLORS"]
WEATHER: tuple[str, ...] = _WORDS["WEATHER"]
TIMES: tuple[str, ...] = _WORDS["TIMES"]
HOMES: tuple[str, ...] = _WORDS["HOMES"]
POSITIVE_FEELINGS: tuple[str, ...] = _WORDS["POSITIVE_FEELINGS"]
NEGATIVE_FEELINGS: tuple[str, ...] = _WORDS["NEGATIVE_FEELINGS"]
ADJECTIVES: tuple[str, ...] = _WORDS["ADJECTIVES"]
ACTIVITIES: tuple[tuple[str, ...], ...] = _WORDS["ACTIVITIES"]
SCENERY: tuple[str, ...] = _WORDS["SCENERY"]
THINGS: tuple[str, ...] = _WORDS["THINGS"]
TRINKETS: tuple[str, ...] = _WORDS["TRINKETS"]
BUGS: tuple[str, ...] = _WORDS["BUGS"]
HIDING_SPOTS: tuple[str, ...] = _WORDS["HIDING_SPOTS"]
SOUNDS: tuple[str, ...] = _WORDS["SOUNDS"]
SMELLS: tuple[str, ...] = _WORDS["SMELLS"]
HELPERS: tuple[tuple[str, ...], ...] = _WORDS["HELPERS"]
LANDMARKS: tuple[str, ...] = _WORDS["LANDMARKS"]
OBSTACLES: tuple[str, ...] = _WORDS["OBSTACLES"]
SHELTERS: tuple[str, ...] = _WORDS["SHELTERS"]
CALM_ACTIVITIES: tuple[str, ...] = _WORDS["CALM_ACTIVITIES"]
BUILDS: tuple[tuple[str, ...], ...] = _WORDS["BUILDS"]
BUILD_FAILURES: tuple[str, ...] = _WORDS["BUILD_FAILURES"]
SKILLS: tuple[tuple[str, ...], ...] = _WORDS["SKILLS"]
MYSTERIES: tuple[tuple[str, ...], ...] = _WORDS["MYSTERIES"]
FRIEND_PROBLEMS: tuple[tuple[str, ...], ...] = _WORDS["FRIEND_PROBLEMS"]
RESCUES: tuple[tuple[str, ...], ...] = _WORDS["RESCUES"]
FEARS: tuple[tuple[str, ...], ...] = _WORDS["FEARS"]
SEEDS: tuple[tuple[str, ...], ...] = _WORDS["SEEDS"]
BAKES: tuple[tuple[str, ...], ...] = _WORDS["BAKES"]
INGREDIENTS: tuple[str, ...] = _WORDS["INGREDIENTS"]
BAKE_PROBLEMS: tuple[tuple[str, ...], ...] = _WORDS["BAKE_PROBLEMS"]
SPEECH_SAID: tuple[str, ...] = _WORDS["SPEECH_SAID"]
SPEECH_EXCLAIMED: tuple[str, ...] = _WORDS["SPEECH_EXCLAIMED"]
SPEECH_ASKED: tuple[str, ...] = _WORDS["SPEECH_ASKED"]
MOVES: tuple[str, ...] = _WORDS["MOVES"]
ADVERBS: tuple[str, ...] = _WORDS["ADVERBS"]
DAY_WORDS: tuple[str, ...] = _WORDS["DAY_WORDS"]
CAKES: tuple[str, ...] = _WORDS["CAKES"]
NUMBERS: tuple[str, ...] = _WORDS["NUMBERS"]

# The word lists that templates can name as fresh slots: ``{color}`` draws a new colour each time.
# The names of tuple-valued lists (FAMILY, ACTIVITIES, BUILDS, ...) are drawn row by row in code.
WORD_LISTS: dict[str, tuple] = {
    "girl": GIRL_NAMES,
    "boy": BOY_NAMES,
    "pet": PET_NAMES,
    "animal": ANIMALS,
    "cadj": CHARACTER_ADJECTIVES,
    "family": FAMILY,
    "place": PLACES,
    "obj": OBJECTS,
    "food": FOODS,
    "color": COLORS,
    "weather": WEATHER,
    "tod": TIMES,
    "home": HOMES,
    "pos": POSITIVE_FEELINGS,
    "neg": NEGATIVE_FEELINGS,
    "adj": ADJECTIVES,
    "activity": ACTIVITIES,
    "scen": SCENERY,
    "thing": THINGS,
    "trinket": TRINKETS,
    "bug": BUGS,
    "hide": HIDING_SPOTS,
    "sound": SOUNDS,
    "smell": SMELLS,
    "helpers": HELPERS,
    "helper": tuple(row[0] for row in HELPERS),
    "cake": CAKES,
    "lm": LANDMARKS,
    "obst": OBSTACLES,
    "shelter": SHELTERS,
    "calm": CALM_ACTIVITIES,
    "build": BUILDS,
    "bfail": BUILD_FAILURES,
    "skill": SKILLS,
    "mystery": MYSTERIES,
    "fproblem": FRIEND_PROBLEMS,
    "rescue": RESCUES,
    "fear": FEARS,
    "seed": SEEDS,
    "bake": BAKES,
    "ingredient": INGREDIENTS,
    "bproblem": BAKE_PROBLEMS,
    "say.": SPEECH_SAID,
    "say!": SPEECH_EXCLAIMED,
    "say?": SPEECH_ASKED,
    "move": MOVES,
    "adv": ADVERBS,
    "dayword": DAY_WORDS,
    "number": NUMBERS,
}
"""Every word list by slot name, each ordered from common to rare (the order is the Zipf rank)."""

# ----------------------------------------------------------------------------------------------------
# Sentence templates (TEMPLATES in the data file). ``{H}``/``{he}``/``{his}``/``{him}`` is the hero,
# ``{F}``/``{fhe}``/``{fhis}``/``{fhim}`` the friend (``{Fw}`` "her friend Tom" and ``{Fi}`` "a boy named
# Tom" introduce them), ``{M}`` the family member (``{Mw}`` "her mom"), ``{P}`` the place, ``{O}``/``{On}``
# the object, ``{FD}`` the food, ``{W}`` the weather, ``{A}``/``{Ad}`` a favourite activity. Those are
# fixed per story; any other slot names a word list and draws a fresh word. Sentence starts are
# capitalised after filling, so templates start lowercase where a pronoun comes first.
# ----------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, tuple[str, ...]] = _WORDS["TEMPLATES"]
"""Sentence templates by story part and plot step."""

# What each quoted line ends with decides how it is reported: "...," said Tom / "...?" asked Tom.
_SPEECH_KEY = {".": "say.", "!": "say!", "?": "say?"}

# "a" before a vowel sound becomes "an"; these words start with a vowel letter but not a vowel sound.
_NOT_AN = frozenset({"one", "once", "unicorn", "uniform", "useful", "usual", "ukulele", "unique", "united", "union"})
_ARTICLE_RE = re.compile(r"\b([Aa]) ([A-Za-z]+)")

_SENTENCE_START_RE = re.compile(r"([.!?] )([a-z])")

# Word tokens: letters with an optional apostrophe part ("didn't", "I'm"). A trailing "'s" (a possessive
# or "it's") is dropped so "Tom's" counts as "tom".
_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _fix_article(match: re.Match) -> str:
    """``a apple`` -> ``an apple`` (regex callback)."""
    article, word = match.group(1), match.group(2)
    if word[0] in "aeiouAEIOU" and word.lower() not in _NOT_AN:
        article += "n"
    return f"{article} {word}"


def _upper_start(match: re.Match) -> str:
    """``. she`` -> ``. She`` (regex callback)."""
    return match.group(1) + match.group(2).upper()


def _cap(sentence: str) -> str:
    """Capitalise the first letter of a sentence, also when it opens with a quote."""
    if sentence[0] == '"':
        return '"' + sentence[1].upper() + sentence[2:]
    return sentence[0].upper() + sentence[1:]


@lru_cache(maxsize=8)
def _tables(zipf_a: float) -> dict[str, tuple[tuple, list[float]]]:
    """Per word list: its items and cumulative Zipf weights ``1 / rank**zipf_a`` (cached per exponent)."""
    out = {}
    for name, items in WORD_LISTS.items():
        ranks = np.arange(1, len(items) + 1, dtype=np.float64)
        out[name] = (items, np.cumsum(ranks**-zipf_a).tolist())
    return out


class _Slots(dict):
    """Template values: the story's fixed cast, and a fresh Zipfian draw for any other list name."""

    __slots__ = ("story",)

    def __missing__(self, key: str) -> str:
        # str.format_map calls this for a slot the story has not fixed: draw a fresh word each time.
        return self.story.draw(key)


class _Story:
    """One story being written: its random stream, its fixed cast and the sentence helpers."""

    __slots__ = ("_rng", "_u", "_k", "_tables", "d", "used", "friend")

    def __init__(self, rng: np.random.Generator, tables: dict) -> None:
        self._rng = rng
        self._u = rng.random(_BATCH).tolist()
        self._k = 0
        self._tables = tables
        self.d = _Slots()
        self.d.story = self
        self.used: set[str] = set()  # templates already used: a story does not repeat a sentence frame
        self.friend = False  # whether the friend has entered the story (endings may then name them)

    def u(self) -> float:
        """The next uniform number in [0, 1) from this story's own stream."""
        k = self._k
        if k == len(self._u):
            # Rare: continue the same stream, so the story stays deterministic however long it gets.
            self._u = self._rng.random(_BATCH).tolist()
            k = 0
        self._k = k + 1
        return self._u[k]

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self.u() < p

    def one_of(self, seq):
        """A uniformly chosen element (templates of a step are equally likely: variety, not a tail)."""
        return seq[int(self.u() * len(seq))]

    def draw(self, name: str):
        """A Zipfian draw from word list ``name``: rank ``r`` with probability ``~ 1 / r**a``."""
        items, cum = self._tables[name]
        i = bisect_right(cum, self.u() * cum[-1])
        return items[i if i < len(items) else -1]

    def fill(self, template: str) -> str:
        """Fill a template's slots; a second pass fills slots that the drawn words carry ("{his}")."""
        text = template.format_map(self.d)
        if "{" in text:
            text = text.format_map(self.d)
        return text

    def pick(self, key: str) -> str:
        """A template from group ``key``, avoiding (with two tries) one this story already used."""
        group = TEMPLATES[key]
        template = self.one_of(group)
        if template in self.used:
            template = self.one_of(group)
            if template in self.used:
                template = self.one_of(group)
        self.used.add(template)
        return template

    def t(self, key: str) -> str:
        """One sentence (or two) from template group ``key``, filled and capitalised."""
        return _cap(self.fill(self.pick(key)))

    def line(self, speaker: str, text: str) -> str:
        """Report the quoted ``text`` (ending in . ! or ?) as said by ``speaker``, in one of three forms."""
        body, end = text[:-1], text[-1]
        body = body[0].upper() + body[1:]
        key = _SPEECH_KEY[end]
        # Plain "said"/"asked"/"shouted" about half the time, as in children's books; else the Zipf tail.
        verb = self._tables[key][0][0] if self.u() < 0.45 else self.draw(key)
        inner = "," if end == "." else end
        form = self.u()
        if form < 0.45 and " " not in verb:  # not '"..." asked softly Tom': inversion needs a one-word verb
            return f'"{body}{inner}" {verb} {speaker}.'
        if form < 0.75:
            return _cap(f'{speaker} {verb}, "{body}{end}"')
        return f'"{body}{inner}" {speaker} {verb}.'

    def say(self, who: str, key: str) -> str:
        """A quoted line from template group ``key``, spoken by the cast member in slot ``who``."""
        return self.line(self.d[who], self.fill(self.pick(key)))


# ----------------------------------------------------------------------------------------------------
# Cast and plots. Each plot returns (calm, trouble): scene fillers may only go into the calm part, so
# a description never interrupts the problem and its resolution.
# ----------------------------------------------------------------------------------------------------


def _cast(s: _Story) -> None:
    """Fix the story's hero, friend, family member, place, object, food, weather and pastime."""
    d = s.d
    female = s.chance(0.5)
    d["he"], d["his"], d["him"] = ("she", "her", "her") if female else ("he", "his", "him")
    ffemale = s.chance(0.5)
    d["fhe"], d["fhis"], d["fhim"] = ("she", "her", "her") if ffemale else ("he", "his", "him")
    if s.chance(0.3):
        # An animal hero ("a little fox named Pip") with an animal friend.
        kind, name, fkind = s.draw("animal"), s.draw("pet"), s.draw("animal")
        fname = s.draw("pet")
        while fname == name:  # a friend never shares the hero's name
            fname = s.draw("pet")
        d["Hk"], d["Fk"] = kind, fkind
        adj = s.draw("cadj")
        d["Hi"] = f"a {adj} {kind} named {name}" if s.chance(0.7) else f"a little {kind} called {name}"
        d["Fi"] = f"a {s.draw('cadj')} {fkind} named {fname}"
        d["Fw"] = f"{d['his']} friend {fname} the {fkind}"
    else:
        name = s.draw("girl" if female else "boy")
        fname = s.draw("girl" if ffemale else "boy")
        while fname == name:
            fname = s.draw("girl" if ffemale else "boy")
        kind, fkind = ("girl" if female else "boy"), ("girl" if ffemale else "boy")
        d["Hk"], d["Fk"] = kind, fkind
        r = s.u()
        if r < 0.4:
            d["Hi"] = f"a little {kind} named {name}"
        elif r < 0.8:
            d["Hi"] = f"a {s.draw('cadj')} {kind} named {name}"
        else:
            d["Hi"] = f"a {kind} called {name}"
        d["Fi"] = f"a {fkind} named {fname}"
        d["Fw"] = f"{d['his']} friend {fname}"
    d["H"], d["F"] = name, fname
    member, pronoun = s.draw("family")
    d["M"], d["mhe"] = member, pronoun
    d["mhis"], d["mhim"] = ("her", "her") if pronoun == "she" else ("his", "him")
    d["Mw"] = f"{d['his']} {member}"
    noun = s.draw("obj")
    r = s.u()
    d["On"] = noun
    d["O"] = f"{s.draw('color')} {noun}" if r < 0.4 else f"{s.draw('adj')} {noun}" if r < 0.7 else noun
    d["P"], d["FD"], d["W"] = s.draw("place"), s.draw("food"), s.draw("weather")
    d["A"], d["Ad"] = s.draw("activity")


def _moral(s: _Story, plot: str) -> None:
    """Fix the lesson the ending may state."""
    s.d["ML"] = s.one_of(TEMPLATES[plot + ".moral"])


def _plot_lost(s: _Story) -> tuple[list[str], list[str]]:
    """The hero loses the object, searches, gets help and finds it."""
    calm = [s.t("lost.go")]
    if s.chance(0.6):
        calm.append(s.t("lost.play"))
    if s.chance(0.4):
        calm.append(s.say("H", "lost.happy"))
    tr = [s.t("lost.gone"), s.t("feel.bad"), s.say("H", "lost.cry")]
    if s.chance(0.5):
        tr.append(s.t("lost.think"))
    for _ in range(1 + int(s.u() * 3)):
        tr.append(s.t("lost.search"))
    friend_came = s.chance(0.5)
    if friend_came:
        s.friend = True
        tr += [s.t("lost.helpcome"), s.say("H", "lost.tell"), s.say("F", "lost.helpline")]
    elif s.chance(0.5):
        tr.append(s.say("Mw", "lost.helpline"))
    # Only a friend who has come into the story can be the one who finds the object.
    tr.append(s.t("lost.found_friend" if friend_came and s.chance(0.5) else "lost.found"))
    tr.append(s.say("H", "lost.joy"))
    if s.chance(0.5):
        tr.append(s.t("lost.state"))
    tr.append(s.t("lost.end"))
    _moral(s, "lost")
    return calm, tr


def _plot_build(s: _Story) -> tuple[list[str], list[str]]:
    """Hero and friend build something; it falls; they build it better together."""
    d = s.d
    d["B"], d["Bn"], d["MAT"] = s.draw("build")
    s.friend = True
    calm = [s.t("build.start"), s.say("H", "build.say")]
    if s.chance(0.5):
        calm.append(s.say("F", "build.plan"))
    calm.append(s.t("build.work"))
    if s.chance(0.5):
        calm.append(s.t("build.more"))
    tr = [s.t("build.fail"), s.t("feel.bad"), s.say("F", "build.comfort")]
    for _ in range(1 + int(s.u() * 2)):
        tr.append(s.t("build.again"))
    tr += [s.t("build.done"), s.say("H" if s.chance(0.5) else "F", "build.cheer")]
    if s.chance(0.5):
        tr += [s.t("build.show"), s.say("Mw", "build.praise")]
    if s.chance(0.5):
        tr.append(s.t("build.play"))
    _moral(s, "build")
    return calm, tr


def _plot_race(s: _Story) -> tuple[list[str], list[str]]:
    """A race in which the hero stops to help a fallen friend."""
    d = s.d
    d["lm"] = s.draw("lm")  # the finish line stays the same all story
    s.friend = True
    calm = [s.t("race.start"), s.say("F", "race.say")]
    if s.chance(0.5):
        calm.append(s.say("H", "race.accept"))
    calm.append(s.t("race.go"))
    if s.chance(0.6):
        calm.append(s.t("race.lead"))
    tr = [s.t("race.fall"), s.t("race.choice"), s.say("H", "race.ask")]
    if s.chance(0.6):
        tr.append(s.say("F", "race.okay"))
    tr += [s.t("race.help"), s.say("F", "race.thank")]
    if s.chance(0.6):
        tr.append(s.t("race.after"))
    _moral(s, "race")
    return calm, tr


def _plot_getting_lost(s: _Story) -> tuple[list[str], list[str]]:
    """The hero wanders off, is lost, meets a helper and is brought back to the family."""
    d = s.d
    d["X"], d["Xr"] = s.draw("helpers")
    d["lm"] = s.draw("lm")
    calm = [s.t("gl.go")]
    if s.chance(0.5):
        calm.append(s.t("gl.busy"))
    tr = [s.t("gl.follow"), s.t("gl.lost"), s.t("feel.bad"), s.say("H", "gl.call")]
    if s.chance(0.6):
        tr.append(s.t("gl.try"))
    if s.chance(0.4):
        tr.append(s.t("gl.dark"))
    tr += [s.t("gl.meet"), s.say("Xr", "gl.ask"), s.say("H", "gl.answer"), s.say("Xr", "gl.promise")]
    tr += [s.t("gl.back"), s.t("gl.found"), s.say("Mw", "gl.hug"), s.t("gl.end")]
    _moral(s, "gl")
    return calm, tr


def _plot_help(s: _Story) -> tuple[list[str], list[str]]:
    """A friend is in trouble; the first idea fails; the hero helps."""
    d = s.d
    d["FO"] = s.draw("obj")
    s.friend = True
    problem, first, fix, thanks = s.draw("fproblem")
    calm = [s.t("help.go")]
    tr = [s.t("help.see"), s.say("H", "help.ask"), s.line(d["F"], s.fill(problem))]
    if s.chance(0.6):
        tr.append(s.say("H", "help.cando"))
    tr.append(_cap(s.fill(first)))
    if s.chance(0.5):
        tr.append(s.t("help.think"))
    tr += [_cap(s.fill(fix)), s.line(d["F"], s.fill(thanks)), s.t("help.end")]
    _moral(s, "help")
    return calm, tr


def _plot_storm(s: _Story) -> tuple[list[str], list[str]]:
    """A storm comes; the hero shelters with family; it passes."""
    calm = [s.t("storm.start")]
    tr = [s.t("storm.come"), s.t("storm.big"), s.say("H", "storm.scared"), s.t("storm.run")]
    tr += [s.say("Mw", "storm.comfort"), s.t("storm.wait")]
    if s.chance(0.5):
        tr.append(s.t("storm.window"))
    tr += [s.t("storm.pass"), s.t("storm.rainbow"), s.say("H", "storm.look")]
    if s.chance(0.5):
        tr.append(s.t("storm.after"))
    _moral(s, "storm")
    return calm, tr


def _plot_birthday(s: _Story) -> tuple[list[str], list[str]]:
    """The hero makes a gift; it gets spoiled; it is loved anyway."""
    d = s.d
    for_friend = s.chance(0.5)
    s.friend = for_friend
    # First mention "her friend Tom's birthday"; the friend speaks later as "Tom".
    d["BD"], d["BDs"] = (d["Fw"], d["F"]) if for_friend else (d["Mw"], d["Mw"])
    calm = [s.t("bday.start"), s.say("H", "bday.wonder"), s.t("bday.make")]
    if s.chance(0.5):
        calm.append(s.t("bday.secret"))
    tr = [s.t("bday.problem"), s.t("feel.bad")]
    if s.chance(0.6):
        tr.append(s.t("bday.try"))
    tr += [s.t("bday.give"), s.say("BDs", "bday.love"), s.t("bday.party")]
    _moral(s, "bday")
    return calm, tr


def _plot_share(s: _Story) -> tuple[list[str], list[str]]:
    """The hero will not share, is lonely, is told why and shares."""
    s.friend = True
    calm = [s.t("share.have")]
    if s.chance(0.5):
        calm.append(s.t("feel.good"))
    tr = [s.t("share.come"), s.say("F", "share.ask"), s.say("H", "share.no"), s.t("share.sad"), s.t("share.alone")]
    tr += [s.say("Mw", "share.advice")]
    if s.chance(0.5):
        tr.append(s.t("share.think"))
    tr += [s.say("H", "share.sorry"), s.t("share.end")]
    _moral(s, "share")
    return calm, tr


def _plot_skill(s: _Story) -> tuple[list[str], list[str]]:
    """The hero fails at a new skill, practises and succeeds."""
    d = s.d
    d["S"], d["SF"], d["SW"] = s.draw("skill")
    calm = [s.t("skill.want")]
    if s.chance(0.5):
        calm.append(s.t("skill.watch"))
    tr = [s.t("skill.first"), s.say("H", "skill.quit"), s.say("Mw", "skill.advice")]
    for _ in range(1 + int(s.u() * 2)):
        tr.append(s.t("skill.practice"))
    tr += [s.t("skill.win"), s.say("H", "skill.cheer"), s.t("feel.good")]
    if s.chance(0.4):
        s.friend = True
        tr += [s.t("skill.show"), s.say("F", "skill.teach")]
    _moral(s, "skill")
    return calm, tr


def _plot_mystery(s: _Story) -> tuple[list[str], list[str]]:
    """The hero finds something strange and finds out what it is, with a friend."""
    d = s.d
    thing, noun, attempt, reveal, cheer = s.draw("mystery")
    d["Y"], d["Yn"], d["lm"] = thing, noun, s.draw("lm")
    s.friend = True
    calm = [s.t("myst.find")]
    if s.chance(0.5):
        calm.append(s.t("myst.look"))
    tr = [s.t("myst.show"), s.say("F", "myst.what"), s.say("H", "myst.answer")]
    if s.chance(0.5):
        tr.append(s.t("myst.ask"))
    if s.chance(0.4):
        tr.append(s.t("myst.night"))
    tr += [_cap(s.fill(attempt)), s.fill(reveal), s.line(d["H"], s.fill(cheer))]
    _moral(s, "myst")
    return calm, tr


def _plot_rescue(s: _Story) -> tuple[list[str], list[str]]:
    """The hero hears an animal in trouble and, after a failed try, helps it."""
    d = s.d
    d["R"], d["Rn"], sound, d["RT"], first, fix, end = s.draw("rescue")
    calm = [s.t("rescue.hear")]
    tr = [f'"{sound}"', s.t("rescue.see"), s.say("H", "rescue.say"), _cap(s.fill(first))]
    if s.chance(0.6):
        tr.append(s.say("H", "rescue.call"))
    tr.append(_cap(s.fill(fix)))
    if s.chance(0.5):
        tr.append(s.t("rescue.care"))
    if s.chance(0.4):
        d["RN"] = s.draw("pet")
        tr.append(s.t("rescue.name"))
    tr += [s.fill(end), s.say("H", "rescue.bye")]
    _moral(s, "rescue")
    return calm, tr


def _plot_fear(s: _Story) -> tuple[list[str], list[str]]:
    """The hero is afraid, is encouraged, tries, and the fear turns out smaller than it seemed."""
    d = s.d
    d["Z"], says, attempt, reveal = s.draw("fear")
    if "{Fi}" in reveal:
        s.friend = True
    calm = [s.t("fear.intro")]
    if s.chance(0.5):
        calm.append(s.t("fear.night"))
    tr = [s.t("fear.tell"), s.line(d["H"], s.fill(says)), s.say("Mw", "fear.advice")]
    if s.chance(0.5):
        tr.append(s.t("fear.breath"))
    tr += [_cap(s.fill(attempt)), _cap(s.fill(reveal)), s.say("H", "fear.after"), s.t("feel.good")]
    _moral(s, "fear")
    return calm, tr


def _plot_garden(s: _Story) -> tuple[list[str], list[str]]:
    """The hero plants seeds, grows impatient, waits, and the garden grows."""
    d = s.d
    d["SE"], d["SG"] = s.draw("seed")
    calm = [s.t("garden.plant"), s.t("garden.water")]
    tr = [s.t("garden.wait"), s.say("H", "garden.when"), s.say("Mw", "garden.patient")]
    if s.chance(0.5):
        tr.append(s.t("garden.check"))
    tr += [s.t("garden.sprout"), s.say("H", "garden.look"), s.t("garden.grow"), s.t("feel.good")]
    tr.append(s.t("garden.end"))
    _moral(s, "garden")
    return calm, tr


def _plot_bake(s: _Story) -> tuple[list[str], list[str]]:
    """Hero and family bake; something goes wrong; they fix it and share."""
    d = s.d
    d["K"], d["Kn"] = s.draw("bake")
    s.friend = True
    problem, fix = s.draw("bproblem")
    calm = [s.t("bake.want"), s.t("bake.get"), s.t("bake.mix")]
    tr = ["But " + s.fill(problem), s.say("H", "bake.oops"), _cap(s.fill(fix))]
    if s.chance(0.5):
        tr.append(s.t("bake.wait"))
    tr += [s.t("bake.done"), s.t("bake.share"), s.say("F", "bake.yum")]
    _moral(s, "bake")
    return calm, tr


_PLOTS = (
    _plot_lost,
    _plot_build,
    _plot_race,
    _plot_getting_lost,
    _plot_help,
    _plot_storm,
    _plot_birthday,
    _plot_share,
    _plot_skill,
    _plot_mystery,
    _plot_rescue,
    _plot_fear,
    _plot_garden,
    _plot_bake,
)


def _n_words(sentences: list[str]) -> int:
    """Whitespace-separated words in a list of sentences."""
    return sum(x.count(" ") + 1 for x in sentences)


def generate_story(index: int, seed: int = 0, *, zipf_a: float = DEFAULT_ZIPF_A) -> str:
    """Story number ``index`` of corpus ``seed``: a function of ``(seed, index, zipf_a)`` alone.

    Args:
        index: The story's position in the corpus (>= 0).
        seed: The corpus seed (>= 0).
        zipf_a: Zipf exponent of the slot fillers; larger makes rare words rarer.

    Returns:
        One story: ASCII, one line, single spaces, between :data:`MIN_WORDS` and :data:`MAX_WORDS` words.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if not zipf_a >= 0:
        raise ValueError(f"zipf_a must be >= 0 (0 is uniform), got {zipf_a}")
    s = _Story(np.random.default_rng([seed, index]), _tables(float(zipf_a)))
    _cast(s)
    opening = [s.t("open.intro")]
    if s.chance(0.8):
        opening.append(s.t("open.trait"))
    if s.chance(0.3):
        opening.append(s.t("open.weather"))
    calm, trouble = s.one_of(_PLOTS)(s)
    ending = []
    if s.friend and s.chance(0.4):
        ending.append(s.t("coda.friend"))
    if s.chance(0.5):
        ending.append(s.t("moral"))
    if not ending or s.chance(0.5):
        ending.append(s.t("end"))

    head = opening + calm
    total = _n_words(head) + _n_words(trouble) + _n_words(ending)
    # A few scene sentences in the calm part (0 to 4, most often 0 or 1): they vary the length and
    # carry much of the rare vocabulary, but too many would drown the plot. More are added only to
    # reach MIN_WORDS.
    n_extra = int(s.u() ** 1.5 * 5)
    while n_extra > 0 or total < MIN_WORDS:
        extra = s.t("extra")
        n = extra.count(" ") + 1
        if total + n > MAX_WORDS:
            break
        head.insert(1 + int(s.u() * len(head)), extra)
        total += n
        n_extra -= 1
    while total > MAX_WORDS and len(head) > 1:
        # Safety net, never hit by the current templates: drop optional scene sentences.
        total -= head.pop().count(" ") + 1
    text = " ".join(head + trouble + ending)
    # Templates with two sentences ("... tight. {he} promised ...") leave a lower-case start after a
    # full stop; one pass over the story fixes them all.
    text = _SENTENCE_START_RE.sub(_upper_start, text)
    return _ARTICLE_RE.sub(_fix_article, text)


def iter_stories(n: int, seed: int = 0, *, start: int = 0, zipf_a: float = DEFAULT_ZIPF_A) -> Iterator[str]:
    """Stories ``start`` to ``start + n - 1`` of corpus ``seed``, one at a time (for large corpora)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for i in range(start, start + n):
        yield generate_story(i, seed, zipf_a=zipf_a)


def generate_stories(n: int, seed: int = 0, *, zipf_a: float = DEFAULT_ZIPF_A) -> list[str]:
    """``n`` stories of corpus ``seed``: deterministic and prefix-stable.

    ``generate_stories(k, seed)`` equals ``generate_stories(n, seed)[:k]`` for every ``k <= n``, because
    story ``i`` depends only on ``(seed, i)``.

    Args:
        n: How many stories (>= 0).
        seed: The corpus seed (>= 0); different seeds give different corpora.
        zipf_a: Zipf exponent of the slot fillers (default :data:`DEFAULT_ZIPF_A`).
    """
    return list(iter_stories(n, seed, zipf_a=zipf_a))


# ----------------------------------------------------------------------------------------------------
# Vocabulary and frequency measures (usable on any text, real or generated).
# ----------------------------------------------------------------------------------------------------


def tokenize_words(text: str) -> list[str]:
    """Lower-case word tokens of ``text``: letters with an optional apostrophe part, trailing ``'s`` dropped."""
    out = _TOKEN_RE.findall(text.lower())
    return [w[:-2] if w.endswith("'s") else w for w in out]


def _strings(value) -> Iterator[str]:
    """Every string in a word-list entry (a string or a tuple of strings)."""
    if isinstance(value, str):
        yield value
    else:
        yield from value


@lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word type a story can contain: the words of all word lists and all templates.

    A superset of what any finite corpus uses: rare entries may not appear in a small one.
    """
    # Words that plot and cast code write directly: "an" (article fix), "but" (bake plot) and the
    # cast's phrases ("a little girl named Lily", "her friend Tom the fox").
    words: set[str] = set(tokenize_words("an but a little named called girl boy he she his her him friend the"))
    for items in WORD_LISTS.values():
        for item in items:
            for text in _strings(item):
                words.update(tokenize_words(re.sub(r"\{[^}]*\}", " ", text)))
    for group in TEMPLATES.values():
        for text in group:
            words.update(tokenize_words(re.sub(r"\{[^}]*\}", " ", text)))
    return frozenset(words)


def word_frequencies(stories: Iterable[str]) -> Counter:
    """Token counts over ``stories`` (see :func:`tokenize_words`)."""
    counts: Counter = Counter()
    for story in stories:
        counts.update(tokenize_words(story))
    return counts


WORD_ID_BITS = 21
"""Bits of a word id in the packed n-gram keys of :class:`NgramDiversity`: three ids fit one int64 while a corpus has
at most 2**21 (about 2.1M) distinct words."""
STORIES_PER_CHUNK = 8192
"""Stories split into words at once by :func:`word_id_chunks`."""
_BREAK = "\x00"  # between two stories in a chunk's text: not a word character, so no word spans it
_WORD_OR_BREAK_RE = re.compile(_TOKEN_RE.pattern + "|" + _BREAK)


class WordIds(dict):
    """Word tokens as ids: a dict from each token string :data:`_TOKEN_RE` matches to the id of its word
    (:func:`tokenize_words`' form, trailing ``'s`` dropped), ids 0, 1, ... in order of first sight, and the
    story break to -1. :attr:`words` lists the words by id. A lookup of an unseen token adds it, so
    ``map(ids.__getitem__, tokens)`` converts a list of tokens at C speed."""

    def __init__(self) -> None:
        super().__init__({_BREAK: -1})
        self.words: list[str] = []
        self._index: dict[str, int] = {}

    def __missing__(self, token: str) -> int:
        word = token[:-2] if token.endswith("'s") else token
        index = self._index.get(word)
        if index is None:
            index = self._index[word] = len(self.words)
            self.words.append(word)
        self[token] = index
        return index


def word_id_chunks(stories: Iterable[str], ids: WordIds, chunk: int | None = None) -> Iterator[np.ndarray]:
    """The words of ``stories`` as ids of ``ids`` (:class:`WordIds`), ``chunk`` stories (default
    :data:`STORIES_PER_CHUNK`) at a time: per chunk an int64 array of each story's word ids followed by -1.
    The same words as :func:`tokenize_words` story by story, from one lower-casing and one regular-expression
    pass over the chunk's text."""
    size = STORIES_PER_CHUNK if chunk is None else chunk
    batch: list[str] = []
    for story in itertools.chain(stories, [None]):
        if story is not None:
            batch.append(story)
            if len(batch) < size:
                continue
        if not batch:
            break
        text = _BREAK.join(batch)
        if text.count(_BREAK) != len(batch) - 1:  # a story holds the break character: a space splits words alike
            text = _BREAK.join(s.replace(_BREAK, " ") for s in batch)
        tokens = _WORD_OR_BREAK_RE.findall(text.lower() + _BREAK)
        batch = []
        yield np.fromiter(map(ids.__getitem__, tokens), dtype=np.int64, count=len(tokens))


def _ngram_columns(flat: np.ndarray, n: int) -> list[np.ndarray]:
    """The word n-grams inside the stories of one :func:`word_id_chunks` array (none spans a -1), in order, as
    ``n`` columns of ids."""
    m = max(len(flat) - n + 1, 0)
    columns = [flat[j : j + m] for j in range(n)]
    inside = np.ones(m, dtype=bool)
    for column in columns:
        inside &= column >= 0
    return [column[inside] for column in columns]


def distinct_sorted(keys: np.ndarray) -> np.ndarray:
    """The distinct values of ``keys``, sorted: as ``np.unique``, whose hash-based path (NumPy 2.3 and later) is
    tens of times slower on wide int64 keys than this sort."""
    ordered = np.sort(keys)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


class DistinctKeys:
    """The distinct int64 keys of many arrays, merged now and then (not per array) to keep the cost linear.

    Memory: about 30 bytes per distinct key at a merge's peak (the keys waiting to be merged are kept below
    half of the merged ones, and the merge sorts one concatenated array in place), so a published-size
    synthetic set's tens of millions of distinct trigrams stay around a gigabyte.
    """

    def __init__(self) -> None:
        self._merged = np.empty(0, dtype=np.int64)
        self._parts: list[np.ndarray] = []
        self._pending = 0

    def add(self, keys: np.ndarray) -> None:
        part = distinct_sorted(keys)
        self._parts.append(part)
        self._pending += len(part)
        if self._pending > len(self._merged) // 2 + 2**22:
            self.values()

    def values(self) -> np.ndarray:
        """The distinct keys so far, sorted."""
        if self._parts:
            keys = np.concatenate([self._merged, *self._parts])
            self._merged, self._parts, self._pending = np.empty(0, dtype=np.int64), [], 0  # free them first
            keys.sort(kind="stable")  # in place; sorted runs back to back, which a stable sort merges
            if len(keys) > 1:
                keep = np.empty(len(keys), dtype=bool)
                keep[0] = True
                np.not_equal(keys[1:], keys[:-1], out=keep[1:])
                keys = keys[keep]
            self._merged = keys
        return self._merged


class NgramDiversity:
    """Distinct word n-grams of a corpus fed in parts (:meth:`add`): :meth:`distinct` ``n`` for n = 1, 2, 3 equals
    :func:`distinct_n` of the whole corpus (n-grams within each story, pooled), and :attr:`ids` holds its words.

    Each chunk of stories becomes word ids in one pass (:func:`word_id_chunks`) and its pairs and triples are
    packed into int64 keys (:data:`WORD_ID_BITS` per id) whose distinct values NumPy counts, several times faster
    than sets of word tuples (a published-size synthetic set has millions of stories). Should the corpus hold
    more distinct words than a key can hold, the keys so far are unpacked into sets of id tuples, which take the
    rest.
    """

    ORDERS = (2, 3)

    def __init__(self) -> None:
        self.ids = WordIds()
        self.totals = dict.fromkeys((1, *self.ORDERS), 0)
        """Word n-grams of the corpus, repeats counted, by n."""
        self._keys: dict[int, DistinctKeys] | None = {n: DistinctKeys() for n in self.ORDERS}
        self._tuples: dict[int, set[tuple[int, ...]]] = {}

    def add(self, stories: Iterable[str]) -> None:
        for flat in word_id_chunks(stories, self.ids):
            self.totals[1] += int((flat >= 0).sum())
            if self._keys is not None and len(self.ids.words) > 2**WORD_ID_BITS:
                self._tuples = {n: set(zip(*self._unpack(keys.values(), n))) for n, keys in self._keys.items()}
                self._keys = None
            for n in self.ORDERS:
                columns = _ngram_columns(flat, n)
                self.totals[n] += len(columns[0])
                if self._keys is not None:
                    packed = columns[0].copy()
                    for column in columns[1:]:
                        packed = (packed << WORD_ID_BITS) | column
                    self._keys[n].add(packed)
                else:
                    self._tuples[n].update(zip(*(column.tolist() for column in columns)))

    @staticmethod
    def _unpack(keys: np.ndarray, n: int) -> list[list[int]]:
        mask = 2**WORD_ID_BITS - 1
        return [((keys >> (WORD_ID_BITS * (n - 1 - j))) & mask).tolist() for j in range(n)]

    def distinct(self, n: int) -> int:
        """Distinct word n-grams so far (n = 1: words)."""
        if n == 1:
            return len(self.ids.words)  # every word given an id occurs in the corpus
        if self._keys is not None:
            return len(self._keys[n].values())
        return len(self._tuples[n])

    def distinct_ratio(self, n: int) -> float:
        """:func:`distinct_n` of the corpus so far: distinct over all word n-grams (0.0 when there are none)."""
        return self.distinct(n) / self.totals[n] if self.totals[n] else 0.0


def document_frequencies(stories: Iterable[str]) -> tuple[Counter, int]:
    """For each word, the number of stories containing it; and the number of stories.

    Vectorised per chunk of stories (:func:`word_id_chunks`): the distinct (story, word) pairs, counted by word.
    """
    ids = WordIds()
    counts = np.zeros(0, dtype=np.int64)
    n = 0
    for flat in word_id_chunks(stories, ids):
        breaks = flat < 0
        story = np.cumsum(breaks) - breaks  # the story of each token, within the chunk
        pairs = distinct_sorted((story[~breaks] << 32) | flat[~breaks])
        per_word = np.bincount(pairs & (2**32 - 1), minlength=len(ids.words))
        counts = np.concatenate([counts, np.zeros(len(per_word) - len(counts), dtype=np.int64)]) + per_word
        n += int(breaks.sum())
    return Counter(dict(zip(ids.words, counts.tolist()))), n


def rare_words(stories: Iterable[str], max_doc_freq: float = 0.005, min_docs: int = 1) -> set[str]:
    """Words that occur in at least ``min_docs`` stories but in fewer than ``max_doc_freq`` of them.

    The long tail that a collapsing model is expected to lose first: measure it on real text, then
    check how much of it a generation's samples still use (:func:`vocabulary_coverage`).
    """
    df, n = document_frequencies(stories)
    if n == 0:
        return set()
    limit = max_doc_freq * n
    return {w for w, c in df.items() if min_docs <= c < limit}


def vocabulary_coverage(words: Iterable[str], stories: Iterable[str]) -> float:
    """The fraction of ``words`` that occur at least once in ``stories`` (1.0 for no words)."""
    wanted = set(words)
    if not wanted:
        return 1.0
    seen: set[str] = set()
    for story in stories:
        seen.update(tokenize_words(story))
    return len(wanted & seen) / len(wanted)


def distinct_n(stories: Iterable[str], n: int = 2) -> float:
    """Distinct-n of a corpus: distinct word n-grams divided by all word n-grams (0.0 when there are none).

    Corpus-level (Li et al., 2016): n-grams are counted within each story (never across two) and pooled
    over all stories. Lower values mean more repetition; a collapsing generator repeats itself.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for story in stories:
        words = tokenize_words(story)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def rank_frequency_slope(counts: Mapping[str, int], n_points: int = 50) -> float:
    """The slope of log(count) against log(rank), fitted at ``n_points`` log-spaced ranks.

    About -1 for Zipf-like natural text; flatter (nearer 0) when frequencies are more uniform. The
    ranks are spaced evenly in log space so every decade of ranks weighs the same: with all ranks,
    the fit would be dominated by the thousands of tail ranks and their finite-sample cutoff.
    """
    freqs = np.sort(np.fromiter(counts.values(), dtype=np.float64))[::-1]
    freqs = freqs[freqs > 0]
    if len(freqs) < 2:
        raise ValueError("need at least two words with a positive count")
    ranks = np.unique(np.geomspace(1, len(freqs), n_points).astype(np.int64))
    return float(np.polyfit(np.log(ranks), np.log(freqs[ranks - 1]), 1)[0])


def top_k_share(counts: Mapping[str, int], k: int = 10) -> float:
    """The fraction of all tokens taken by the ``k`` most frequent words."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return sum(c for _, c in Counter(counts).most_common(k)) / total


# ----------------------------------------------------------------------------------------------------
# The TinyStories text format.
# ----------------------------------------------------------------------------------------------------


def format_corpus(stories: Iterable[str]) -> str:
    """Stories in the TinyStories ``.txt`` format: each followed by a line ``<|endoftext|>``."""
    parts = []
    for story in stories:
        if not story.strip() or EOT_SEPARATOR in story:
            raise ValueError("a story must be non-empty and must not contain the separator")
        parts.append(f"{story.strip()}\n{EOT_SEPARATOR}\n")
    return "".join(parts)


def write_corpus(
    path: str | os.PathLike, n: int, seed: int = 0, *, zipf_a: float = DEFAULT_ZIPF_A, chunk: int = 10_000
) -> Path:
    """Write ``n`` stories of corpus ``seed`` to ``path`` in the TinyStories ``.txt`` format, atomically.

    Readers see the old file or the complete new one, never a partial write. Stories are generated and
    written ``chunk`` at a time, so a corpus as large as TinyStories (about 2 million stories) never
    sits in memory whole.
    """
    path = Path(path)
    with atomic_open(path, "w") as fh:
        for start in range(0, n, chunk):
            fh.write(format_corpus(iter_stories(min(chunk, n - start), seed, start=start, zipf_a=zipf_a)))
    return path


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Stories from a TinyStories-format ``.txt`` file: text between ``<|endoftext|>`` lines, stripped.

    Lines inside a story are joined with newlines (real TinyStories stories have paragraphs); empty
    stories are skipped.
    """
    stories, lines = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip() == EOT_SEPARATOR:
                text = "\n".join(lines).strip()
                if text:
                    stories.append(text)
                lines = []
            else:
                lines.append(line.rstrip("\n"))
    text = "\n".join(lines).strip()
    if text:
        stories.append(text)
    return stories


def corpus_stats(stories: list[str]) -> dict[str, float]:
    """Summary numbers for a corpus: stories, words per story, word types, top-10 share, Zipf slope."""
    lengths = np.array([len(x.split()) for x in stories], dtype=np.float64)
    counts = word_frequencies(stories)
    return {
        "stories": float(len(stories)),
        "mean_words": float(lengths.mean()) if len(lengths) else 0.0,
        "min_words": float(lengths.min()) if len(lengths) else 0.0,
        "max_words": float(lengths.max()) if len(lengths) else 0.0,
        "word_types": float(len(counts)),
        "top10_share": top_k_share(counts, 10),
        "rank_frequency_slope": rank_frequency_slope(counts) if len(counts) > 1 else math.nan,
    }
