"""Synthetic simple-English children's stories: an offline stand-in corpus, NOT TinyStories.

TinyStories (short stories in simple English) cannot be downloaded on the machines this project is
developed and tested on, so the language-model recipes default to this corpus instead. It is made
here, from word lists and sentence templates written for this project, and every place that shows it
labels it with :data:`STAND_IN_LABEL`. Results on it say nothing about TinyStories itself.

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
# Word lists. The ORDER of every list is its Zipf rank: common, simple words first, rare ones last.
# ----------------------------------------------------------------------------------------------------


def _items(text: str) -> tuple[str, ...]:
    """Comma- or newline-separated entries, stripped, empties dropped, first occurrence kept."""
    out: dict[str, None] = {}
    for line in text.split("\n"):
        for item in line.split(","):
            item = item.strip()
            if item:
                out[item] = None
    return tuple(out)


def _rows(text: str) -> tuple[tuple[str, ...], ...]:
    """Rows of ``|``-separated fields, one row per line; a line starting with ``|`` or a space continues it."""
    records: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if records and (line[0] == "|" or line[0] == " "):
            # Long rows are wrapped over several lines to keep the source readable.
            records[-1] += " " + line.strip()
        else:
            records.append(line.strip())
    return tuple(tuple(f.strip() for f in record.split("|")) for record in records)


GIRL_NAMES = _items("""
Lily, Sue, Mia, Anna, Lucy, Emma, Sara, Amy, Ella, Zoe, Mary, Rose, Kate, Lisa, Jane, Molly, Daisy, Ruby,
Grace, Emily, Sophie, Chloe, Hannah, Ivy, Nora, Maya, Ava, Lola, Bella, Jenny, Kim, Tina, Ellie, Holly,
Julia, Alice, Clara, Ada, Eva, Hazel, Isla, Leah, Maddie, Millie, Poppy, Rosie, Sadie, Tess, Willow,
Amelia, Olivia, Layla, Nina, Gina, Dora, Fiona, Greta, Heidi, Irene, Josie, Kara, Lena, Maria, Nadia,
Paula, Quinn, Rita, Stella, Tara, Uma, Vera, Wendy, Yara, Zara, Abby, Beth, Cora, Dana, Edith, Faye,
Gemma, Hope, Iris, Jade, Kayla, Lara, Mabel, Nell, Penny, Rachel, Selma, Thea, Una, Viola, Wren,
Yvonne, Zelda, Aisha, Bianca, Carmen, Delia, Esme, Flora, Gwen, Harriet, Imogen, Juno, Kira, Luna,
Matilda, Noor, Octavia, Priya, Rosa, Sienna, Tilly, Ursula, Valerie, Winnie, Anya, Bonnie, Celia,
Dina, Elsie, Freya, Georgia, Hattie, Ines, Joy, Keiko, Lottie, Mina, Nia, Orla, Pearl, Rhea, Suki,
Talia, Vida, Wanda, Amara, Beatrix, Cleo, Dahlia, Eloise, Fern, Goldie, Honor, Ingrid, Jasmine,
Kenzie, Lydia, Marigold, Niamh, Odette, Petra, Rowena, Saoirse, Tamsin, Ulla, Verity, Winifred,
Yasmin, Zinnia
""")

BOY_NAMES = _items("""
Tim, Tom, Ben, Max, Sam, Jack, Leo, Joe, Bob, Jake, Finn, Luke, Noah, Adam, Dan, Eli, Owen, Liam,
Oscar, Theo, Henry, Jim, Ned, Ted, Ollie, Charlie, Harry, Billy, Timmy, Jamie, Alex, Ryan, Kevin,
Mark, Peter, Paul, Mike, Nick, Andy, Will, Ethan, Lucas, Mason, Logan, Caleb, Dylan, Felix, George,
Hugo, Ian, Jonah, Kai, Louis, Milo, Nate, Omar, Pedro, Ray, Seth, Toby, Victor, Wyatt, Xavier, Yusuf,
Zack, Aaron, Brian, Colin, David, Eric, Frank, Gabe, Hank, Isaac, Jesse, Karl, Lenny, Marco, Neil,
Oliver, Patrick, Rico, Simon, Tyler, Vince, Wes, Abe, Bruno, Cody, Derek, Emil, Fred, Gus, Hector,
Ivan, Jasper, Kurt, Lars, Moses, Nico, Otto, Percy, Ronan, Silas, Tariq, Ulysses, Vito, Walter, Yuri,
Zane, Ahmed, Basil, Cyrus, Dmitri, Ezra, Flynn, Gideon, Hamish, Ignatius, Jude, Kenji, Lorenzo,
Magnus, Nikhil, Orson, Pascal, Quentin, Rafael, Soren, Thaddeus, Umar, Vaughn, Wilbur, Yannick,
Zebedee, Alfie, Barnaby, Cedric, Desmond, Elliot, Fergus, Gilbert, Horace, Idris, Jerome, Kofi,
Leopold, Mortimer, Nathaniel, Osric, Rupert, Sebastian, Tobias, Ambrose, Benedict
""")

PET_NAMES = _items("""
Pip, Spot, Fluffy, Buddy, Coco, Bun, Tiny, Sunny, Patch, Rusty, Mittens, Whiskers, Bubbles, Biscuit,
Peanut, Pebble, Button, Sparky, Snowy, Ziggy, Dot, Bo, Momo, Nutmeg, Pickle, Pudding, Socks, Toffee,
Waffles, Jellybean, Muffin, Noodle, Pepper, Pumpkin, Rascal, Scamper, Shadow, Skipper, Smudge,
Sprinkles, Squeak, Stripe, Taffy, Thistle, Tumble, Twig, Wiggles, Zippy, Acorn, Bramble, Clover,
Dusty, Ember, Fidget, Gizmo, Hopper, Inky, Jiggles, Kiwi, Lulu, Mochi, Nibbles, Puddle, Quill, Ripple,
Sage, Tofu, Velvet, Wisp, Yoyo, Bingo, Chip, Doodle, Fuzz, Goober, Honey, Jinx, Marble, Nugget,
Paddle, Pogo, Roo, Sprout, Tater, Turnip, Widget, Zuzu, Barley, Cinder, Dumpling, Flicker, Gumdrop,
Hazelnut, Juniper, Kipper, Lentil, Marzipan, Nimbus, Pistachio, Quince, Rhubarb, Saffron, Truffle,
Umber, Wobble
""")

ANIMALS = _items("""
fox, rabbit, bear, cat, dog, mouse, bird, duck, frog, owl, squirrel, puppy, kitten, bunny, pig, lamb,
horse, pony, turtle, monkey, elephant, lion, tiger, giraffe, hen, chick, goat, deer, hedgehog,
raccoon, otter, beaver, penguin, seal, koala, panda, zebra, kangaroo, dolphin, whale, crab, snail,
ladybug, bee, butterfly, dinosaur, badger, mole, wolf, goose, swan, parrot, crow, robin, sparrow,
lizard, bat, hippo, rhino, camel, llama, sheep, donkey, moose, skunk, chipmunk, hamster, guinea pig,
ferret, weasel, flamingo, pelican, toucan, peacock, ostrich, walrus, octopus, starfish, seahorse,
platypus, armadillo, sloth, lemur, meerkat, gecko, iguana, tortoise, porcupine, wombat, yak, bison,
lynx, cheetah, pangolin, narwhal, axolotl, okapi, tapir, quokka, ibex, gazelle, marmot, puffin,
kingfisher, heron, stork, magpie, wren, vole, shrew, newt, salamander, chameleon
""")

CHARACTER_ADJECTIVES = _items("""
little, small, kind, happy, brave, shy, curious, tiny, young, friendly, clever, silly, sleepy, playful,
gentle, cheerful, fluffy, busy, quiet, grumpy, bouncy, nosy, proud, timid, cheeky, speedy, chubby,
fuzzy, spotted, striped, scruffy, wise, lonely, noisy, dreamy, clumsy, daring, nimble, plucky, fussy,
giggly, sunny, jolly, polite, helpful, stubborn, gallant, bashful, mischievous, spirited, earnest,
wistful, sprightly, tenacious, whimsical
""")

# (word, pronoun): who a character lives with. "mom" first: the family member of most stories.
FAMILY = _rows("""
mom | she
dad | he
grandma | she
grandpa | he
mother | she
father | he
big sister | she
big brother | he
aunt | she
uncle | he
nana | she
granny | she
grandad | he
papa | he
mama | she
cousin | she
godmother | she
stepdad | he
great-grandma | she
""")

PLACES = _items("""
the park, the garden, the forest, the beach, the playground, the backyard, the lake, the farm,
the woods, the river, the pond, the hill, the meadow, the zoo, the library, the store, the school,
the market, the yard, the field, the street, the bakery, the barn, the attic, the cave, the pool,
the living room, the mountain, the valley, the orchard, the jungle, the castle, the village,
the harbor, the island, the fair, the circus, the museum, the train station, the toy store, the swamp,
the desert, the greenhouse, the lighthouse, the aquarium, the campsite, the treehouse, the porch,
the dock, the workshop, the classroom, the sandbox, the vegetable patch, the flower shop,
the post office, the fire station, the ice rink, the skate park, the bus stop, the rose garden,
the duck pond, the soccer field, the music room, the art room, the snowy hill, the sunflower field,
the pumpkin patch, the apple orchard, the old mill, the boathouse, the garden shed, the henhouse,
the stable, the waterfall, the creek, the marsh, the canyon, the cottage, the tea shop, the pier,
the boardwalk, the carousel, the botanical garden, the observatory, the planetarium, the windmill,
the quarry, the lagoon, the tide pools, the sand dunes, the bamboo grove, the pine forest, the moor,
the bayou, the prairie, the vineyard, the rooftop, the courtyard, the cellar, the pantry,
the laundry room, the gazebo, the hedge maze, the village square, the clock tower, the bell tower,
the fjord, the tundra, the rainforest, the glacier, the oasis, the savanna, the ravine, the grotto
""")

OBJECTS = _items("""
ball, kite, toy car, teddy bear, doll, book, hat, bike, drum, boat, truck, train, robot, puzzle,
blanket, cup, shoe, crayon, balloon, bucket, wagon, jar, bag, bell, rope, basket, pillow, umbrella,
whistle, scarf, mitten, ring, necklace, box, shovel, spoon, backpack, lunch box, jump rope, yo-yo,
marble, stuffed bunny, toy plane, fire truck, tractor, toy dinosaur, rubber duck, bubble wand,
pinwheel, flashlight, lantern, skateboard, scooter, sled, fishing rod, paintbrush, sketchbook, diary,
crown, wand, cape, toy sword, shield, bracelet, locket, piggy bank, sailboat, tea set, dollhouse,
rocking horse, train set, hula hoop, frisbee, puppet, spinning top, beanbag, roller skate, water gun,
music box, snow globe, compass, telescope, harmonica, magnifying glass, xylophone, tambourine,
ukulele, kazoo, recorder, flute, violin, guitar, trumpet, slinky, boomerang, hourglass, globe,
marionette, finger puppet, paper crane, toy soldier, nutcracker, pogo stick, kaleidoscope,
pocket watch, tiara, bird whistle, jigsaw, sticker book, coloring book, pencil case, lunch bag,
raincoat, sun hat, bow tie, hair clip, jewelry box, treasure chest, toy boat, toy drum, toy train,
toy horse, toy rocket, toy bus, toy tractor, toy lamb, kitten plush, dragon plush, owl plush,
snow shovel, sand bucket, watering can, butterfly net, bug jar, birdhouse, bread basket, picnic basket,
tin whistle, clay pot, glass bead, wooden spoon, wooden horse, patchwork quilt, knitted hat, wool sock,
mood ring, friendship bracelet, lucky coin, seashell necklace, pressed flower, star chart, weather vane,
sundial, metronome, accordion, banjo, mandolin, ocarina, castanets, maracas, triangle, bagpipes,
abacus, periscope, sextant, zither, thimble, quill, inkwell, spyglass, barometer, gyroscope, astrolabe
""")

FOODS = _items("""
cookies, apples, cake, bread, soup, candy, ice cream, pie, sandwiches, grapes, bananas, carrots, cheese,
pizza, cherries, strawberries, pancakes, muffins, popcorn, crackers, berries, oranges, noodles, rice,
honey, jam, cupcakes, peas, corn, nuts, pears, plums, peaches, watermelon, blueberries, raisins,
pretzels, toast, eggs, beans, tomatoes, potatoes, chips, waffles, cereal, yogurt, pudding, jelly,
peanuts, seeds, dumplings, figs, apricots, porridge, mangoes, coconut, cornbread, gingerbread,
marshmallows, oatmeal, tacos, bagels, biscuits, scones, pickles, olives, broccoli, spinach, celery,
radishes, turnips, dates, walnuts, almonds, cashews, chestnuts, flapjacks, crumpets, rice cakes,
sweet potatoes, meatballs, spaghetti, macaroni, lasagna, quiche, omelets, fritters, lentil soup,
plum jam, blackberries, raspberries, gooseberries, cranberries, mulberries, tangerines, clementines,
nectarines, persimmons, papaya, guava, lychees, starfruit, kumquats, pomegranate seeds, rhubarb crumble,
shortbread, custard, fruitcake, tapioca, couscous, dumpling soup
""")

COLORS = _items("""
red, blue, green, yellow, pink, purple, orange, white, black, brown, gold, silver, gray, bright red,
light blue, dark green, turquoise, lavender, crimson, amber, teal, maroon, navy, lilac, peach,
scarlet, indigo, magenta, beige, ivory, coral, mint, cream, copper, bronze, rust, emerald, sapphire,
lime, cherry, plum, mauve, cobalt, ochre, saffron, chartreuse, vermilion, cerulean
""")

WEATHER = _items("""
sunny, warm, bright, cold, windy, rainy, cloudy, snowy, hot, cool, breezy, chilly, foggy, lovely,
golden, frosty, crisp, gray, misty, quiet, muggy, drizzly, icy, balmy, blustery, dreary, humid, sultry,
hazy, overcast
""")

# Plain times only: a weather word here ("foggy dawn") could contradict the story's weather.
TIMES = _items("""
morning, day, afternoon, evening, Saturday, Sunday, holiday, Monday, Friday, Tuesday, Wednesday,
Thursday, weekend
""")

HOMES = _items("""
a small town, a little house, a big city, a quiet village, a cozy house, a house by the sea,
a little house in the woods, a tall tree, a warm burrow, a busy town, a farm, a green valley,
a yellow house, a blue house with a red door, a little cottage, a house on a hill, a snowy village,
a hole under an old oak, a boat on the river, a sunny town, a big apartment, a house near the forest,
a village by the mountains, a little nest, a town by the lake, a windmill, a lighthouse,
a caravan, a cabin in the pines, a houseboat, a hamlet by the moor
""")

POSITIVE_FEELINGS = _items("""
happy, glad, proud, excited, thankful, cheerful, joyful, calm, safe, brave, delighted, thrilled,
grateful, pleased, giddy, relieved, hopeful, peaceful, overjoyed, jolly, merry, content, elated,
ecstatic, serene, jubilant, blissful, triumphant, exuberant, buoyant
""")

NEGATIVE_FEELINGS = _items("""
sad, scared, worried, upset, angry, lonely, grumpy, nervous, afraid, frightened, mad, cross, unhappy,
confused, tired, jealous, frustrated, embarrassed, anxious, miserable, hurt, sorry, disappointed,
glum, uneasy, heartbroken, sulky, teary, bewildered, frantic, forlorn, dismayed, puzzled, restless,
helpless, crestfallen, despondent, flustered, perturbed, woebegone
""")

ADJECTIVES = _items("""
big, little, small, new, old, shiny, soft, round, pretty, tiny, long, funny, special, bright, tall,
smooth, heavy, strange, magic, wooden, silly, bumpy, fuzzy, sparkly, striped, spotted, squishy,
sticky, giant, huge, wobbly, crinkly, dusty, muddy, rusty, fancy, plain, lumpy, curly, glittery,
painted, knitted, furry, prickly, bouncy, squeaky, shimmering, gleaming, chunky, enormous,
miniature, ancient, mysterious, peculiar, delicate, sturdy, rickety, lopsided, gigantic, speckled,
frilly, polished, tattered, dainty, gnarled, iridescent, burnished, filigree, gossamer
""")

# (base form, past tense): what a character likes to do; "{his}" is filled in a second pass.
ACTIVITIES = _rows("""
play tag | played tag
play hide and seek | played hide and seek
draw pictures | drew pictures
sing songs | sang songs
dance | danced
jump in puddles | jumped in puddles
read books | read books
play ball | played ball
ride {his} bike | rode {his} bike
build with blocks | built with blocks
swing on the swings | swung on the swings
dig in the sand | dug in the sand
paint | painted
climb trees | climbed trees
run in the grass | ran in the grass
blow bubbles | blew bubbles
look at the stars | looked at the stars
pick flowers | picked flowers
play dress-up | played dress-up
splash in the water | splashed in the water
collect shells | collected shells
chase butterflies | chased butterflies
play with {his} toys | played with {his} toys
look at the clouds | looked at the clouds
roll down the hill | rolled down the hill
tell jokes | told jokes
make mud pies | made mud pies
feed the ducks | fed the ducks
play catch | played catch
go fishing | went fishing
hunt for bugs | hunted for bugs
make paper boats | made paper boats
play pretend | played pretend
do puzzles | did puzzles
stack stones | stacked stones
watch the trains | watched the trains
play in the leaves | played in the leaves
hop like a frog | hopped like a frog
play board games | played board games
play marbles | played marbles
spin in circles | spun in circles
play hopscotch | played hopscotch
collect rocks | collected rocks
make snow angels | made snow angels
roast marshmallows | roasted marshmallows
sketch birds | sketched birds
play checkers | played checkers
do somersaults | did somersaults
tell stories | told stories
ride the carousel | rode the carousel
play leapfrog | played leapfrog
go sledding | went sledding
look for fossils | looked for fossils
pretend to be a pirate | pretended to be a pirate
fold paper cranes | folded paper cranes
watch the boats | watched the boats
whittle sticks | whittled sticks
press flowers | pressed flowers
practice yodeling | practiced yodeling
""")

SCENERY = _items("""
flowers, trees, birds, butterflies, leaves, rocks, shells, bugs, puddles, ducks, bees, squirrels,
stones, bushes, mushrooms, ants, acorns, pinecones, daisies, dandelions, tulips, roses, fireflies,
dragonflies, berries, snails, worms, pebbles, feathers, sticks, sunflowers, ferns, reeds, lilies,
toadstools, crickets, ladybugs, beetles, caterpillars, poppies, bluebells, daffodils, pumpkins,
chestnuts, seashells, crabs, tadpoles, minnows, sparrows, pigeons, geese, swans, lambs, goats,
chickens, bunnies, buttercups, cattails, thistles, snowdrops, marigolds, lichens, foxgloves,
hollyhocks, periwinkles, cowslips, sea urchins, barnacles
""")

THINGS = _items("""
bench, rock, log, fence, tree, bush, gate, wall, puddle, stump, flower bed, lamp post, hedge, mailbox,
swing, slide, bridge, fountain, statue, well, barrel, wheelbarrow, haystack, scarecrow, birdbath,
picnic table, tire swing, garden hose, flower pot, signpost, stone wall, water pump, totem pole,
sundial, rain barrel, compost heap, trellis, millstone
""")

TRINKETS = _items("""
stone, leaf, feather, shell, acorn, pinecone, button, coin, pebble, marble, bottle cap, flower,
twig, bead, key, ribbon, snail shell, bird feather, conker, sea glass, fossil, crystal, arrowhead,
geode, cowrie shell
""")

BUGS = _items("""
butterfly, ladybug, bee, dragonfly, moth, beetle, grasshopper, firefly, caterpillar, cricket,
bumblebee, damselfly, katydid, lacewing, cicada
""")

HIDING_SPOTS = _items("""
under the bed, behind the couch, under a bush, in the tall grass, behind a tree, under the slide,
in the sandbox, near the pond, under the table, in the toy box, behind the door, in the garden,
under a big leaf, on a high shelf, in the laundry basket, under the porch, in a flower pot,
behind the shed, inside a hollow log, under the car, in the dog's bed, behind the curtains,
in a pile of leaves, under the stairs, in the mailbox, on top of the fridge, inside a boot,
next to the fence, under the blanket, in {his} backpack, in the closet, by the front door,
in the chicken coop, in the bread basket, under a rock, in the fruit bowl, behind the bookshelf,
in the wheelbarrow, under the doormat, in the birdbath, in a teapot, in the cookie jar,
inside the piano, behind the radiator, in the umbrella stand, under the hammock, inside a rain boot,
in the woodpile, behind the grandfather clock
""")

SOUNDS = _items("""
birds singing, the wind in the trees, a dog barking, children laughing, the waves, bees buzzing,
a train far away, frogs croaking, leaves rustling, a bell ringing, a clock ticking, a cow mooing,
ducks quacking, an owl hooting, a rooster crowing, crickets chirping, a truck rumbling, music playing,
a woodpecker tapping, a horse neighing, water splashing, a cat purring, sheep bleating,
a boat horn, geese honking, a kettle whistling, wind chimes tinkling, a brook babbling, seagulls crying,
pigeons cooing, an ice cream truck, a fire crackling, a cuckoo clock, a tractor chugging,
a foghorn, a distant bagpipe, a chorus of cicadas
""")

SMELLS = _items("""
fresh bread, flowers, cookies, the sea, pine trees, rain, cut grass, hot soup, apple pie, warm toast,
roses, lemons, wood smoke, popcorn, cinnamon, wet earth, oranges, honey, mint, lavender, pancakes,
strawberries, chocolate, lilacs, vanilla, hay, fresh paint, clean laundry, peppermint, seaweed,
cedar, nutmeg, jasmine, gingerbread, petrichor
""")

# (first mention, later mention): someone who happens to come by.
HELPERS = _rows("""
a kind old man | the old man
a friendly farmer | the farmer
a police officer | the officer
a tall lady with a dog | the lady
a park ranger | the ranger
a mail carrier | the mail carrier
an old owl | the owl
a wise turtle | the turtle
a friendly deer | the deer
a baker | the baker
a teacher | the teacher
a fisherman | the fisherman
a gardener | the gardener
a bus driver | the bus driver
a firefighter | the firefighter
a lifeguard | the lifeguard
a nurse | the nurse
a crossing guard | the crossing guard
a painter | the painter
a librarian | the librarian
a zookeeper | the zookeeper
a beekeeper | the beekeeper
a shepherd | the shepherd
a woodcutter | the woodcutter
a kind neighbor | the neighbor
a musician | the musician
a lighthouse keeper | the lighthouse keeper
a potter | the potter
a sailor | the sailor
a carpenter | the carpenter
a shopkeeper | the shopkeeper
a miller | the miller
a clockmaker | the clockmaker
a blacksmith | the blacksmith
a basket weaver | the weaver
a cartographer | the cartographer
""")

LANDMARKS = _items("""
big tree, old fence, red gate, swings, top of the hill, pond, big rock, oak tree, end of the street,
mailbox, fountain, slide, barn, bridge, flag pole, lamp post, willow tree, windmill, water tower,
old well, picnic table, garden wall, duck pond, apple tree, bus stop, statue, scarecrow, boathouse,
stone arch, weathervane, maypole
""")

OBSTACLES = _items("""
rock, root, stick, log, bump, hole, toy, rope, shoe, ball, branch, bucket, hose, brick, garden rake,
molehill, tree root, pinecone, watering can, tent peg
""")

SHELTERS = _items("""
into the house, into the barn, under the porch roof, into a small cave, into the car, into the shed,
under a picnic shelter, into the kitchen, into the playhouse, into the tent, into the library,
into a bus shelter, into the greenhouse, under the bridge, into the tool shed, into the old mill,
into the boathouse, into the henhouse, into the lighthouse, into the gazebo
""")

CALM_ACTIVITIES = _items("""
read a book, sang songs, drank warm milk, told stories, played cards, cuddled under a blanket,
made shadow puppets, drew pictures, counted the raindrops on the window, ate some crackers,
built a pillow fort, played a guessing game, hummed lullabies, did a puzzle, played checkers,
listened to the radio, knitted a little scarf, sorted buttons by color, played dominoes,
made paper snowflakes
""")

# (what is built, the noun used later, what it is made of).
BUILDS = _rows("""
a sand castle | castle | sand
a tall tower | tower | blocks
a fort | fort | pillows and blankets
a snowman | snowman | snow
a tree house | tree house | wood and nails
a bird house | bird house | little boards
a boat | boat | sticks and leaves
a bridge | bridge | flat stones
a rocket | rocket | big boxes
a robot | robot | old boxes and cans
a train | train | kitchen chairs
a dam | dam | rocks and mud
a nest for the birds | nest | twigs and grass
a race car | car | cardboard
a puppet theater | theater | a big box and some cloth
an igloo | igloo | blocks of snow
a scarecrow | scarecrow | straw and old clothes
a maze | maze | boxes and crates
a raft | raft | logs and rope
a spaceship | spaceship | boxes and foil
a castle | castle | couch cushions
a wishing well | well | stones and a bucket
a windmill | windmill | paper and sticks
a lighthouse | lighthouse | cans and a flashlight
a pagoda | pagoda | bamboo sticks
""")

BUILD_FAILURES = _items("""
a big gust of wind knocked it down, it wobbled and fell over, a dog ran right through it,
a big wave washed it away, the bottom was too weak and it broke, it tipped over with a crash,
it started to rain and everything got soggy, a goat came by and started to eat it,
one side sagged and the whole thing slid apart, a ball bounced into it and it toppled over,
a squirrel jumped on top and it collapsed, the tape came unstuck and it fell to pieces
""")

# (base form, how the first try went, how it went in the end); "{he}" etc. filled in a second pass.
SKILLS = _rows("""
ride a bike | {he} wobbled and fell into the grass | {he} pedaled all the way down the street without falling
swim | {he} sank and got water up {his} nose | {he} kicked {his} legs and swam across the pool
tie {his} shoes | the laces got all tangled | {he} made two loops and pulled them into a neat bow
fly a kite | the kite crashed into the grass | the kite rose high into the sky and danced in the wind
skate | {his} feet slipped, and {he} landed on {his} bottom | {he} glided across the ice like a bird
jump rope | the rope caught on {his} feet | {he} jumped ten times in a row
whistle | only air came out | a loud, clear whistle came out
climb the big tree | {he} slipped on the first branch | {he} climbed all the way to the top branch and waved
read | the letters all looked mixed up | {he} read a whole book to {his} {M}
skip stones | the stone sank with a plop | the stone skipped three times across the water
do a cartwheel | {he} fell over sideways | {his} legs went up and over, and {he} landed on {his} feet
play the piano | the notes sounded all wrong | {he} played a whole song without a mistake
catch a ball | the ball bounced off {his} nose | {he} caught the ball with both hands
juggle | the balls fell everywhere | {he} kept three balls in the air
row a boat | the boat went around in circles | the boat moved straight across the lake
paint a picture | the colors ran together into a brown mess | {he} painted a beautiful picture of a {animal}
knit | the yarn got tangled around {his} fingers | {he} knitted a little scarf for {his} {M}
ride a pony | the pony would not move | the pony trotted around the field with {him} on its back
dive | {he} landed with a big belly flop | {he} dove into the water like a dolphin
play the violin | it squeaked like a mouse | {he} played a soft and lovely tune
write {his} name | the letters came out backwards | {he} wrote {his} name in big, neat letters
ski | {he} tumbled into the snow | {he} zoomed down the hill and stopped at the bottom
surf | a wave knocked {him} off the board | {he} stood up and rode a wave all the way to the shore
count to one hundred | {he} got mixed up after twenty | {he} counted all the way to one hundred
balance on a beam | {he} tipped off after two steps | {he} walked from one end to the other with {his} arms out
""")

# (the thing found, its noun, the first try to learn what it is, what it turned out to be, a line).
MYSTERIES = _rows("""
a strange egg | egg
| {H} kept the egg warm in a basket full of soft grass.
| One morning, the egg began to crack, and out came a tiny yellow duckling!
| Hello, little one!
an old key | key
| They tried the key in every door of the house, but none of the doors opened.
| Then {H} remembered the dusty box in the attic. The key fit! Inside were old photos and a letter from when {his}
  grandma was little.
| This is a real treasure!
a map | map
| They followed the map past the {lm} and over the little bridge.
| Where the map had a big X, they dug in the dirt and found a tin box full of {color} marbles.
| We found the treasure!
a tiny door in a tree | door
| {H} knocked on the tiny door, but nobody answered.
| The next day, the door was open, and a little mouse waved from inside. It had a tiny table and a tiny bed!
| So that's who lives here!
a glass bottle with a note inside | bottle
| The note was wet, and {H} could only read one word: friend.
| They wrote a note back and put it in the sea. Weeks later, a letter came from a child who lived far away.
| We have a new friend!
a shiny stone | stone
| They washed the stone in the creek so they could see it better.
| When the sun hit it, the stone glowed with every color of the rainbow.
| It's like a tiny rainbow!
a big footprint in the mud | footprint
| They followed the footprints along the river.
| At the end, they found a big, friendly cow eating grass.
| It was just a cow!
a golden feather | feather
| They looked for the bird that had lost it, but the sky was empty.
| At sunset, a bird with golden wings landed on the fence and sang a beautiful song.
| It came back for us!
a wooden box with a lock | box
| They shook the box, and something inside rattled.
| {Mw} found the key on a string in the drawer, and inside the box were seeds and a note that said, plant me.
| Let's plant them right now!
a trail of glitter | trail
| They followed the glitter across the grass and around the house.
| At the end of the trail sat {his} little cousin, covered in glitter and giggling.
| So you made the trail!
""")

# (what the friend says is wrong, a first try that fails, the fix, what the friend says after).
FRIEND_PROBLEMS = _rows("""
My {FO} is stuck in the tree!
| {H} jumped as high as {he} could, but {he} could not reach it.
| Then {H} found a long stick and gently pushed the {FO} free.
| You got it down! Thank you!
My {FO} is broken.
| They tried to fix it with a piece of string, but it fell apart again.
| Then {H} got some tape and glue from {his} {M}, and together they fixed it.
| It looks as good as new!
I dropped my lunch in the mud, and now I have nothing to eat.
| {H} tried to wash it in the pond, but it was too dirty.
| So {H} opened {his} bag and shared {his} {FD} with {F}.
| Yum! This is the best lunch ever!
I have nobody to play with.
| {H} asked some other kids to join them, but they were too busy.
| So {H} smiled and said they could play together, and they {Ad} all afternoon.
| You are the best friend ever!
My {FO} fell into the pond!
| {H} reached out, but the water was too deep.
| Then {H} saw a net by the fence and used it to scoop the {FO} out of the water.
| You saved it!
I am scared to go down the big slide.
| {H} held {F}'s hand, but {F} was still scared.
| So they went down the slide together, side by side.
| That was fun! Let's do it again!
My balloon flew away.
| They ran after it, but it was already too high.
| Then {H} gave {F} the {color} balloon that {he} was holding.
| Now we both have something to smile about!
I can't find my way home.
| They looked at the street signs, but {F} did not know the names.
| Then {H} walked {F} to the {lm}, and from there {F} knew the way.
| I know where I am now!
My {FO} is all wet from the rain.
| They tried to dry it with leaves, but the leaves were wet too.
| So they took it inside and put it by the warm stove until it was dry.
| It's warm and dry again!
I got a splinter in my finger.
| {H} tried to pull it out, but it was too small to hold.
| Then {Mw} came with tweezers and took it out in one quick tug.
| It doesn't hurt anymore!
""")

# (the creature, its noun, the sound it made, what was wrong, a first try, the rescue, how it ended).
RESCUES = _rows("""
a kitten | kitten | Meow, meow!
| was stuck high up in a tree
| {H} tried to climb the tree, but the branches were too high.
| Then {Mw} brought a ladder and carefully lifted the kitten down.
| The kitten purred and rubbed against {H}'s legs.
a little bird | bird | Tweet, tweet!
| had fallen out of its nest
| {H} wanted to pick it up, but {he} was afraid to hurt it.
| So {Mw} put on soft gloves and gently set the bird back in its nest.
| The mother bird came back and sang a happy song.
a puppy | puppy | Woof, woof! | was stuck in a deep hole
| {H} reached down, but {his} arms were too short.
| Then {H} found a long board and made a ramp, and the puppy climbed out.
| The puppy licked {H}'s face and wagged its tail.
a duckling | duckling | Quack, quack! | had lost its mother
| {H} looked around the pond, but {he} could not see any big ducks.
| Then {he} heard loud quacking from the reeds and carried the duckling there, where its mother was waiting.
| The duckling swam off behind its mother.
a baby rabbit | rabbit | Squeak! | was caught in a fence
| {H} pulled at the wire, but it would not bend.
| So {Mw} came with big cutters and snipped the wire, and the rabbit hopped free.
| The rabbit looked back once and then hopped into the bushes.
a bee | bee | Bzz, bzz! | was stuck behind the window
| {H} tried to shoo it with {his} hand, but it just buzzed louder.
| Then {H} opened the window wide, and the bee flew out into the sunshine.
| The bee buzzed happily over the flowers.
a hedgehog | hedgehog | Sniff, sniff!
| was tangled in a garden net
| {H} tried to pull the net away, but the hedgehog curled up into a prickly ball.
| So {Mw} cut the net with scissors, one string at a time.
| The hedgehog uncurled and trotted off under the hedge.
a lamb | lamb | Baa, baa! | was caught in a thorny bush
| {H} pulled on the branches, but the thorns scratched {his} hands.
| Then the farmer came with big clippers and cut the lamb free.
| The lamb ran back to the flock, bleating happily.
a frog | frog | Ribbit! | was trapped in an empty bucket
| {H} tried to tip the bucket, but it was full of sticky mud.
| So {H} put a stick in the bucket like a ladder, and the frog climbed out.
| The frog hopped into the pond with a splash.
a baby owl | owl | Hoo, hoo!
| was sitting alone on the cold ground
| {H} wanted to take it home, but {Mw} said its parents were near.
| So they watched quietly from far away until the mother owl swooped down to it.
| The two owls flew up into the big oak tree.
""")

# (the fear, what the hero says about it, the brave try, what it turned out to be).
FEARS = _rows("""
the dark
| I don't like the dark. What if there are monsters?
| That night, {Mw} gave {him} a little lamp shaped like a moon.
| {H} looked around the room. It was just {his} toys and {his} bed, the same as in the day.
the big dog next door | That dog is so big and loud!
| The next day, {H} walked to the fence with {Mw}.
| The big dog wagged its tail and licked {H}'s hand. It just wanted a friend.
the deep water at the pool
| The water is too deep! What if I sink?
| {H} put on {his} armbands and stepped in slowly, holding {Mw}'s hand.
| The water held {him} up. {H} kicked {his} legs and laughed.
the tall slide | The slide is too high!
| {H} climbed up one step at a time.
| Whoosh! {H} slid down and landed in the sand. It was so much fun!
the first day of school | What if nobody likes me?
| {H} walked into the classroom and sat down.
| {Fi} sat next to {him} and shared {fhis} crayons.
the loud vacuum cleaner | It's so loud! It wants to eat me!
| {Mw} showed {him} how it worked and let {him} push the button.
| It was just a machine that ate dust. {H} even helped clean the rug.
the big waves at the beach | The waves will knock me over!
| {H} stood at the edge and let the little waves touch {his} toes.
| The water was cool and tickly. Soon {H} was jumping over the waves.
the doctor | Will it hurt?
| The doctor smiled and let {H} listen to {his} own heart.
| It was over in a second, and {H} got a {color} sticker.
the buzzing bees in the garden | What if they sting me?
| {H} stood very still and watched them.
| The bees flew from flower to flower and did not even look at {him}.
the noise in the attic | What is making that noise?
| {H} and {Mw} climbed up with a flashlight.
| It was only a little mouse, nibbling on a cracker!
the thunder | The sky is growling at me!
| {Mw} counted the seconds between the flash and the boom with {him}.
| The storm was far away, and soon it rolled off over the hills.
the haircut | What if it hurts?
| {H} sat in the big chair and held very still.
| Snip, snip! It did not hurt at all, and {H} looked very smart.
""")

# (what is planted, what grows).
SEEDS = _rows("""
sunflower | tall yellow sunflowers
tomato | red tomatoes
bean | long green beans
pumpkin | big orange pumpkins
carrot | crunchy carrots
strawberry | sweet strawberries
pea | fat green peas
daisy | white daisies
tulip | bright tulips
radish | little pink radishes
lettuce | leafy lettuce
cucumber | cool cucumbers
marigold | orange marigolds
watermelon | striped watermelons
lavender | purple lavender
corn | tall corn
poppy | red poppies
basil | sweet basil
zucchini | big zucchini
nasturtium | orange nasturtiums
kohlrabi | round kohlrabi
""")

# (what is baked, the noun used later).
BAKES = _rows("""
cookies | cookies
a cake | cake
bread | bread
muffins | muffins
a pie | pie
pancakes | pancakes
cupcakes | cupcakes
banana bread | bread
a pizza | pizza
gingerbread men | gingerbread men
scones | scones
waffles | waffles
a lemon cake | cake
cinnamon rolls | rolls
brownies | brownies
oatmeal cookies | cookies
a berry crumble | crumble
pretzels | pretzels
a carrot cake | cake
a rhubarb tart | tart
""")

INGREDIENTS = _items("""
flour, eggs, sugar, milk, butter, honey, salt, berries, chocolate chips, oats, raisins, nuts, cinnamon,
vanilla, bananas, apples, lemon juice, jam, cream, nutmeg, yeast, ginger, maple syrup, coconut,
poppy seeds, cardamom, molasses, buttermilk
""")

# (what went wrong while baking, how it was put right).
BAKE_PROBLEMS = _rows("""
{H} put in salt instead of sugar, and the batter tasted terrible.
| They laughed, threw it out and started again, reading every label carefully.
the bag of flour slipped, and white flour went all over the floor.
| They swept it up together, and {H} even drew a flour smiley face first.
they forgot about the oven, and the {Kn} came out black and smoky.
| They opened the windows, made a new batch and set a timer this time.
the bowl slid off the table and landed upside down.
| They cleaned up the mess and mixed a new bowl, holding it with both hands.
the dog jumped up and licked the batter. | They gave the dog a treat of its own and made the batter again.
{H} cracked an egg, and the shell fell into the bowl. | {Mw} showed {him} how to fish it out with a big piece of shell.
the {Kn} did not rise and came out as flat as a plate. | They found the old yeast, bought fresh yeast and tried again.
""")

SPEECH_SAID = _items("""
said, replied, whispered, answered, explained, added, agreed, sighed, promised, suggested, laughed,
giggled, murmured, mumbled, admitted, announced, offered, declared, muttered, grumbled, chirped,
sniffled, insisted, remarked, whimpered
""")
SPEECH_EXCLAIMED = _items("""
said, shouted, cried, yelled, called, cheered, exclaimed, squealed, laughed, gasped, shrieked, hollered,
giggled, roared, whooped, bellowed, sang out, trilled
""")
SPEECH_ASKED = _items("""
asked, said, wondered, whispered, called, cried, asked softly, asked quietly, begged, pleaded, inquired,
puzzled
""")

MOVES = _items("""
ran, hopped, walked, flew, waddled, jumped, skipped, crawled, scurried, trotted, raced, zoomed, dashed,
wandered, marched, tiptoed, strolled, bounced, galloped, darted, scampered, shuffled, lumbered, pranced,
toddled, zigzagged, ambled, bounded, fluttered, plodded, sprinted, waltzed, sauntered, moseyed
""")

ADVERBS = _items("""
slowly, quickly, carefully, quietly, softly, gently, happily, bravely, loudly, proudly, patiently,
kindly, calmly, sadly, eagerly, nervously, cheerfully, cautiously, sheepishly, hastily, tenderly,
merrily, steadily, boldly, lazily, gleefully, timidly, briskly, diligently, earnestly, wearily,
gracefully, clumsily, hurriedly, noisily, silently, sleepily, curiously, thoughtfully, anxiously,
meticulously, deftly
""")

DAY_WORDS = _items("""
busy, happy, long, exciting, funny, strange, wonderful, special, lovely, good, brave, tiring, magical,
surprising, marvelous, memorable, unforgettable, extraordinary
""")

CAKES = _items(
    "chocolate cake, cupcakes, strawberry cake, lemon cake, carrot cake, honey cake, marble cake, sponge cake"
)

NUMBERS = _items("three, five, ten, four, seven, twelve, twenty, six, eight, nine, eleven, fifteen, thirty")

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
# Sentence templates. ``{H}``/``{he}``/``{his}``/``{him}`` is the hero, ``{F}``/``{fhe}``/``{fhis}``/
# ``{fhim}`` the friend (``{Fw}`` "her friend Tom" and ``{Fi}`` "a boy named Tom" introduce them),
# ``{M}`` the family member (``{Mw}`` "her mom"), ``{P}`` the place, ``{O}``/``{On}`` the object,
# ``{FD}`` the food, ``{W}`` the weather, ``{A}``/``{Ad}`` a favourite activity. Those are fixed per
# story; any other slot names a word list and draws a fresh word. Sentence starts are capitalised
# after filling, so templates start lowercase where a pronoun comes first.
# ----------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, tuple[str, ...]] = {
    # --- opening: who, where, what they love ---------------------------------------------------------
    "open.intro": (
        "Once upon a time, there was {Hi}.",
        "Once upon a time, in {home}, there lived {Hi}.",
        "There was once {Hi} who lived in {home}.",
        "{Hi} lived in {home} with {his} {M}.",
        "Once there was {Hi}.",
        "One {tod}, {Hi} woke up early.",
        "Long ago, in {home}, there lived {Hi}.",
        "In {home}, there lived {Hi}.",
        "Not long ago, there was {Hi} who lived in {home}.",
        "Once upon a time, {Hi} lived in {home}.",
        "This is a story about {Hi}.",
    ),
    "open.trait": (
        "{H} loved to {A}.",
        "{H} was a very {cadj} {Hk}.",
        "{he} liked to {A} every day.",
        "More than anything, {H} loved {his} {O}.",
        "{H} had a {O} that {he} took everywhere.",
        "Every day, {H} liked to {A} with {his} {M}.",
        "{his} favorite thing in the whole world was {his} {O}.",
        "{H} was {cadj} and always wanted to {A}.",
        "{H} lived with {his} {M}, who loved {him} very much.",
        "{H} had a {O}, and {he} loved it very much.",
        "Everyone in {home} knew {H}, the {cadj} {Hk} who loved to {A}.",
        "When {he} was not busy, {H} liked to {A}.",
    ),
    "open.weather": (
        "It was a {W} day.",
        "Outside, the day was {W}.",
        "The weather was {W} that day.",
        "That {tod} was {W}, and {H} could not wait to go outside.",
    ),
    # --- scene fillers: only in the calm part of a story, before the trouble starts -----------------
    "extra": (
        "There were {scen} everywhere.",
        "{H} saw some {scen} near a {thing}.",
        "A {animal} {move} by.",
        "{he} could hear {sound}.",
        "The air smelled like {smell}.",
        "{H} hummed a happy song.",
        "The clouds looked like a {adj} {animal}.",
        "{H} waved to {helper}.",
        "A {color} {bug} landed on {his} hand.",
        "{H} picked up a {adj} {trinket} and put it in {his} pocket.",
        "{H} skipped along the path, counting {scen}.",
        "{he} stopped to look at a {color} {bug}.",
        "{his} tummy rumbled, so {he} ate some {food}.",
        "A soft breeze blew, and the {scen} seemed to dance.",
        "Somewhere nearby, {he} could hear {sound}.",
        "{H} sat on a {thing} for a little while.",
        "{H} found a {color} {trinket} by a {thing}.",
        "Far away, {he} could see a {animal} and some {scen}.",
        "{H} counted the {scen} and got to {number}.",
        "{his} {M} had packed some {food} for later.",
        "A {adj} {animal} watched {him} from behind a {thing}.",
        "{H} smiled at a {animal} that was sitting on a {thing}.",
        "{he} thought about the {food} {his} {M} would make for dinner.",
    ),
    # --- endings ------------------------------------------------------------------------------------
    "end": (
        "It was the best day ever.",
        "That night, {H} went to sleep with a big smile.",
        "{H} felt {pos} all the way home.",
        "It had been a very {dayword} day.",
        "{H} would always remember that day.",
        "When {he} got home, {H} told {his} {M} all about it.",
        "And that night, {H} dreamed of {scen} and {food}.",
        "The end.",
        "{H} went home, tired and {pos}.",
    ),
    "coda.friend": (
        "After that, {H} and {F} {Ad} until it was time to go home.",
        "{H} and {F} laughed all the way home.",
        "From that day on, {H} and {F} were the best of friends.",
        "The next day, {F} came over, and they {Ad} together.",
    ),
    "moral": (
        "{H} learned that {ML}.",
        "From that day on, {H} knew that {ML}.",
        "{H} learned an important lesson: {ML}.",
        "And so {H} found out that {ML}.",
    ),
    "feel.bad": (
        "{H} felt {neg}.",
        "{he} was so {neg} that {he} wanted to cry.",
        "{H} was very {neg}.",
        "{his} eyes filled with tears. {he} felt {neg}.",
        "{H} sat down. {he} felt {neg} and {neg}.",
    ),
    "feel.good": (
        "{H} felt {pos}.",
        "{H} was so {pos}!",
        "{he} jumped up and down, feeling {pos}.",
        "{H} smiled from ear to ear.",
    ),
    # --- lost and found -----------------------------------------------------------------------------
    "lost.go": (
        "{H} took {his} {O} to {P}.",
        "One day, {H} brought {his} {O} to {P}.",
        "{H} and {his} {M} went to {P}, and {H} brought {his} {O}.",
        "{H} carried {his} {O} all the way to {P}.",
    ),
    "lost.play": (
        "{he} played with it all morning.",
        "{H} and {his} {On} had lots of fun.",
        "{he} showed the {On} to everyone {he} met.",
        "{H} {Ad} with the {On} right beside {him}.",
    ),
    "lost.happy": ("I love my {On}!", "This is the best {On} in the world.", "My {On} and I are going to have fun."),
    "lost.gone": (
        "But when it was time to go home, {his} {On} was gone!",
        "After a while, {H} looked down. {his} {On} was not there!",
        "Then {H} put the {On} down to {A}. When {he} came back, it was gone!",
        "But suddenly, {H} could not find {his} {On} anywhere.",
    ),
    "lost.cry": (
        "Where is my {On}?",
        "Oh no! I lost my {On}!",
        "Has anyone seen my {On}?",
        "My {On} is gone! What will I do?",
    ),
    "lost.search": (
        "{he} looked {hide}, but it was not there.",
        "Next, {he} looked {hide}. Nothing!",
        "{he} even looked {hide}, but the {On} was not there either.",
        "{he} searched {hide}, but {he} only found a {trinket}.",
        "{H} checked {hide} and then {hide}, but there was no {On}.",
        "{he} looked {adv} {hide}. Still no {On}.",
    ),
    "lost.think": (
        "{H} tried to remember where {he} had been.",
        "{he} thought hard. Where could it be?",
        "{H} took a deep breath and started to look.",
    ),
    "lost.tell": ("I can't find my {On}.", "My {On} is gone!", "I lost my {O}."),
    "lost.state": (
        "It was a little dirty, but it was not broken.",
        "It was covered in {scen}, but {H} did not mind.",
        "The {On} looked just the same as before.",
    ),
    "lost.helpcome": (
        "Then {Fw} came by and asked what was wrong.",
        "Just then, {Fw} ran over to see why {H} looked so {neg}.",
    ),
    "lost.helpline": (
        "Don't worry. Let's look together.",
        "I will help you find it.",
        "Two pairs of eyes are better than one.",
        "Let's think. Where did you have it last?",
    ),
    "lost.found": (
        "At last, {he} saw something peeking out {hide}. It was {his} {On}!",
        "Then a {animal} came out of the bushes with the {On} in its mouth!",
        "Then {H} remembered. {he} had put it {hide} that morning! {he} ran to look, and there it was.",
        "Just then, {Mw} came over holding the {On}. It had been {hide} all along.",
    ),
    "lost.found_friend": (
        "At last, {F} shouted and held up the {On}. {fhe} had found it {hide}!",
        "Then {F} pointed {hide}. There was the {On}!",
    ),
    "lost.joy": ("My {On}! I found it!", "Thank you so much!", "I will never lose you again, {On}!"),
    "lost.end": (
        "{H} held {his} {On} tight all the way home.",
        "From then on, {H} always kept {his} {On} safe.",
        "{H} hugged the {On} and smiled.",
    ),
    "lost.moral": (
        "it is important to take care of the things you love",
        "friends and family are always there to help",
        "looking carefully can solve a problem",
        "you should never give up",
    ),
    # --- building together --------------------------------------------------------------------------
    "build.start": (
        "{H} and {Fw} wanted to build {B} at {P}.",
        "One day, {H} and {Fw} had a big idea. They would build {B}!",
        "At {P}, {H} met {Fw}, and they decided to build {B}.",
    ),
    "build.say": ("Let's build {B}!", "I want to make the biggest {Bn} in the world!", "We can build {B} together!"),
    "build.plan": (
        "You get the {MAT}, and I will find a good spot.",
        "Let's make it as tall as the {lm}!",
        "I know how! First we need lots of {MAT}.",
    ),
    "build.show": ("{Mw} came to see what they had made.", "Soon {Mw} came over to look."),
    "build.praise": ("What a wonderful {Bn}!", "You two worked so hard!", "I have never seen such a fine {Bn}."),
    "build.play": (
        "They played with their {Bn} until it was time for dinner.",
        "{H} and {F} sat by their {Bn} and ate some {FD}.",
    ),
    "build.work": (
        "They got lots of {MAT} and started to work.",
        "{H} carried the {MAT}, and {F} helped {him} put it all in place.",
        "First, they put the {MAT} in a big pile.",
    ),
    "build.more": (
        "They worked {adv} all morning.",
        "{F} held the {MAT} still while {H} made the top.",
        "Bit by bit, the {Bn} got bigger.",
    ),
    "build.fail": (
        "But when it was almost done, {bfail}.",
        "Then, just as they finished, {bfail}.",
        "Oh no! {bfail}.",
    ),
    "build.comfort": (
        "Don't be sad. We can try again.",
        "It's okay. This time we will make it even better.",
        "We can do it if we work together.",
    ),
    "build.again": (
        "This time, they took their time and worked {adv}.",
        "They made the bottom wide and strong.",
        "{F} had a good idea, and they tried it.",
        "They started again, one piece at a time.",
    ),
    "build.done": (
        "Soon, the {Bn} stood tall and strong.",
        "When they were done, it was the best {Bn} they had ever seen.",
        "At last, their {Bn} was finished, and it did not fall.",
    ),
    "build.cheer": ("We did it!", "Look at our {Bn}!", "It's the best {Bn} ever!"),
    "build.moral": (
        "working together makes hard things easy",
        "if something falls down, you can build it again",
        "two friends can do more than one",
    ),
    # --- a race ---------------------------------------------------------------------------------------
    "race.start": (
        "{H} and {Fw} went to {P} to play.",
        "One day, {H} met {Fw} at {P}.",
        "{H} and {Fw} liked to race at {P}.",
    ),
    "race.say": ("Let's have a race to the {lm}!", "I bet I can beat you to the {lm}!", "Race you to the {lm}!"),
    "race.accept": ("You're on!", "Okay! But I am very fast.", "Let's go!"),
    "race.after": (
        "After that, they sat under the {lm} and shared some {FD}.",
        "They laughed about the race all the way home.",
        "The next day, they raced again, and this time they both were careful.",
    ),
    "race.go": (
        "Ready, set, go! They ran as fast as they could.",
        "They lined up, and off they went!",
        "On the count of three, they started to run.",
    ),
    "race.lead": ("{H} was fast, but {F} was faster.", "{H} was winning!", "They ran side by side."),
    "race.fall": (
        "Then {F} tripped over a {obst} and fell down.",
        "Suddenly, {F} slipped and landed in the grass.",
        "Then {F} fell and hurt {fhis} knee.",
    ),
    "race.choice": (
        "{H} could win the race, but {he} stopped.",
        "{H} saw {F} fall and ran back.",
        "{H} did not keep running. {he} turned around.",
    ),
    "race.ask": ("Are you okay, {F}?", "Does it hurt?", "Let me help you up."),
    "race.okay": ("My knee hurts a little, but I'm okay.", "I'm okay. It's just a scratch."),
    "race.help": (
        "{H} helped {F} get up, and they walked to the {lm} together.",
        "{H} held {F}'s hand, and they finished the race side by side.",
        "They walked the rest of the way together, laughing.",
    ),
    "race.thank": ("Thank you, {H}. You are a good friend.", "You stopped for me!", "Let's call it a tie!"),
    "race.moral": ("being kind is better than winning", "a good friend matters more than a race"),
    # --- lost in a big place -----------------------------------------------------------------------------
    "gl.go": (
        "{H} went to {P} with {his} {M}.",
        "One day, {H} and {his} {M} went to {P}.",
        "{H} was at {P} with {his} {M}.",
    ),
    "gl.busy": (
        "{his} {M} was busy looking at some {scen}.",
        "There were so many people and so many {scen} to see.",
        "{his} {M} stopped to talk to {helper}.",
    ),
    "gl.dark": (
        "The shadows grew long, and the {scen} looked strange and {adj}.",
        "The wind blew, and {H} felt very small.",
    ),
    "gl.follow": (
        "{H} saw a {color} {bug} and followed it.",
        "{H} saw a {animal} and wanted to see where it was going.",
        "{H} heard {sound} and went to look.",
    ),
    "gl.lost": (
        "{he} walked and walked. When {he} looked up, {his} {M} was gone. {H} was lost!",
        "Soon {H} did not know where {he} was. {his} {M} was nowhere to be seen.",
        "When {he} turned around, nothing looked the same. {H} was lost.",
    ),
    "gl.call": ("Where are you?", "I want to go home!", "Help! I'm lost!"),
    "gl.try": (
        "{he} tried to go back, but all the paths looked the same.",
        "{H} sat down on a {thing} and began to cry.",
        "{he} walked one way, then the other, but nothing looked right.",
    ),
    "gl.meet": (
        "Then {X} came by.",
        "Just then, {X} stopped next to {him}.",
        "After a while, {X} saw {him} sitting there.",
    ),
    "gl.ask": ("Why are you crying, little one?", "Are you lost?", "Can I help you?"),
    "gl.answer": ("I lost my {M}.", "I can't find my {M}.", "I don't know where I am."),
    "gl.promise": ("Don't worry. We will find your {M}.", "Come with me. I know the way.", "Let's look together."),
    "gl.back": (
        "They walked back along the path, past the {lm}.",
        "{Xr} took {his} hand, and they walked {adv}.",
        "They followed the path all the way to the {lm}.",
    ),
    "gl.found": (
        "Soon {H} heard a voice calling {his} name. It was {his} {M}!",
        "There, by the {lm}, stood {his} {M}!",
        "Then {H} saw {his} {M} running toward {him}!",
    ),
    "gl.hug": ("I was so worried!", "There you are! I missed you!", "Oh, I am so glad you are safe!"),
    "gl.end": (
        "{H} gave {his} {M} a big hug and thanked {Xr}.",
        "{H} hugged {his} {M} tight. {he} promised to stay close next time.",
        "They hugged and hugged. Then they said thank you to {Xr}.",
    ),
    "gl.moral": ("it is important to stay close to your family", "kind people will help you when you are lost"),
    # --- helping a friend -------------------------------------------------------------------------------
    "help.go": (
        "{H} went to {P} to {A}.",
        "One day, {H} was walking to {P}.",
        "After lunch, {H} ran outside to {A}.",
    ),
    "help.think": (
        "{H} thought and thought. Then {he} had an idea.",
        "{H} looked around for something that could help.",
    ),
    "help.see": (
        "At {P}, {H} saw {Fw} sitting alone.",
        "{H} went to {P} and found {Fw} there, looking {neg}.",
        "One day, {H} saw {Fw} by the {lm}. {F} looked {neg}.",
    ),
    "help.ask": ("What's wrong, {F}?", "Why are you sad?", "Are you okay, {F}?"),
    "help.cando": ("I can help!", "Let me try.", "Don't worry. We will fix it."),
    "help.end": (
        "{H} and {F} smiled at each other.",
        "From that day on, {H} and {F} were best friends.",
        "{F} gave {H} a big hug.",
    ),
    "help.moral": (
        "helping a friend feels good",
        "a friend in need is a friend indeed",
        "small kind acts can make a big difference",
    ),
    # --- a storm ------------------------------------------------------------------------------------------
    "storm.start": (
        "In the morning, the sun was shining at {P}.",
        "{H} was playing with {his} {O} at {P}.",
        "{H} and {his} {M} were having a picnic at {P}.",
    ),
    "storm.come": (
        "Then the sky grew dark. Big gray clouds rolled in.",
        "Suddenly, the wind began to blow, and the trees bent and swayed.",
        "Soon, big drops of rain began to fall.",
    ),
    "storm.big": (
        "Boom! The thunder was very loud.",
        "Flash! Lightning lit up the sky.",
        "The rain came down hard, and the wind howled.",
    ),
    "storm.scared": ("I'm scared!", "What was that?", "I don't like storms!"),
    "storm.run": (
        "{H} ran {shelter}.",
        "{H} and {his} {M} hurried {shelter}.",
        "They ran {shelter} as fast as they could.",
    ),
    "storm.comfort": (
        "The storm can't hurt us in here.",
        "We are safe and dry. Let's wait together.",
        "Storms are loud, but they always pass.",
    ),
    "storm.wait": (
        "While they waited, they {calm}.",
        "To pass the time, {H} and {his} {M} {calm}.",
        "They sat close together and {calm}.",
    ),
    "storm.window": (
        "{H} watched the rain run down the window.",
        "Outside, the trees were dancing in the wind.",
        "{H} pressed {his} nose to the glass and counted the lightning flashes.",
    ),
    "storm.after": (
        "Then {H} put on {his} boots and jumped in the puddles.",
        "{H} and {his} {M} went outside to smell the fresh air.",
    ),
    "storm.pass": (
        "After a while, the rain stopped.",
        "Slowly, the thunder went away.",
        "Soon, the wind grew quiet and the clouds drifted off.",
    ),
    "storm.rainbow": (
        "The sun came out, and there was a big rainbow in the sky.",
        "Everything was wet and shiny, and the {scen} sparkled.",
        "A rainbow stretched over {P}.",
    ),
    "storm.look": ("Look, a rainbow!", "The storm is over!", "That wasn't so bad."),
    "storm.moral": ("storms always pass", "it is easier to be brave with someone you love"),
    # --- a birthday -------------------------------------------------------------------------------------
    "bday.start": (
        "Tomorrow was {BD}'s birthday.",
        "It was almost {BD}'s birthday.",
        "Soon it would be {BD}'s birthday, and {H} wanted to give a special gift.",
    ),
    "bday.wonder": ("What can I give?", "What would make a good present?", "What does everyone love most?"),
    "bday.make": (
        "{H} decided to make a card with {color} hearts on it.",
        "{H} made a necklace with a {color} {trinket} on a string.",
        "{H} painted a picture of a {animal} in a {adj} hat.",
        "{H} made a paper crown with {color} stars.",
        "{H} baked some little cakes with {his} {M}.",
    ),
    "bday.secret": (
        "{H} worked on it in secret all afternoon.",
        "{he} hid the gift under {his} bed so nobody would see it.",
    ),
    "bday.problem": (
        "But on the way, {H} tripped, and the gift fell into a puddle.",
        "But a {animal} ran by and knocked the gift out of {his} hands.",
        "But the wind blew the gift away, and it landed in the mud.",
    ),
    "bday.try": (
        "{H} tried to clean it, but it was still messy.",
        "{he} wiped it with {his} sleeve, but it only got worse.",
    ),
    "bday.give": (
        "{H} gave the gift anyway, feeling a little {neg}.",
        "{H} held out the messy gift and looked at the ground.",
    ),
    "bday.love": (
        "I love it! You made it just for me!",
        "This is the best gift ever!",
        "It's perfect, because you made it.",
    ),
    "bday.party": (
        "They ate {cake} and sang Happy Birthday.",
        "Everyone ate {cake}, and then they {Ad}.",
        "There was {cake}, balloons and lots of laughing.",
    ),
    "bday.moral": ("the best gifts come from the heart", "a gift made with love is worth more than a perfect one"),
    # --- sharing --------------------------------------------------------------------------------------------
    "share.have": (
        "{H} had a big bag of {FD}.",
        "{his} {M} gave {H} some {FD} for a snack.",
        "{his} {M} gave {H} a {O} as a present.",
    ),
    "share.come": ("Then {Fw} came over.", "Just then, {Fw} walked by.", "Soon {Fw} came to see."),
    "share.ask": ("Can I have some?", "Can I play too?", "Will you share with me?"),
    "share.no": ("No, it's mine!", "No! I want it all for me.", "Go away. This is mine."),
    "share.sad": (
        "{F} walked away, feeling {neg}.",
        "{F} looked down at the ground and went home.",
        "{F}'s face fell, and {fhe} walked away slowly.",
    ),
    "share.alone": (
        "Now {H} had it all, but nobody to play with. {he} did not feel happy.",
        "{H} sat alone. Somehow, it was not fun anymore.",
    ),
    "share.think": (
        "{H} thought about what {his} {M} said.",
        "{H} looked at the {FD} and then at the door.",
    ),
    "share.advice": (
        "Things are more fun when you share them.",
        "How would you feel if {F} did not share with you?",
        "A friend is worth more than a snack.",
    ),
    "share.sorry": ("I'm sorry, {F}. Do you want to share?", "Come back! We can share!", "I was wrong. Let's share."),
    "share.end": (
        "They shared it together, and it was much more fun.",
        "{F} smiled, and they played together all afternoon.",
        "They sat side by side and shared everything.",
    ),
    "share.moral": ("sharing makes everyone happy", "things are better when you share them with a friend"),
    # --- learning something new ---------------------------------------------------------------------
    "skill.want": (
        "{H} wanted to learn to {S}.",
        "More than anything, {H} wanted to {S}.",
        "{his} {M} could {S}, and {H} wanted to learn too.",
    ),
    "skill.watch": (
        "{H} watched {Mw} do it. It looked so easy!",
        "{he} saw other kids at {P} do it, and {he} wanted to try too.",
    ),
    "skill.show": ("The next day, {H} ran to show {Fw}.", "Later, {H} showed {Fw} what {he} could do."),
    "skill.teach": ("Wow! Can you teach me?", "That's amazing! I want to learn too!"),
    "skill.first": (
        "The first time {he} tried, {SF}.",
        "{H} tried, but {SF}.",
        "It was much harder than it looked: {SF}.",
    ),
    "skill.quit": ("I can't do it!", "It's too hard!", "I will never learn!"),
    "skill.advice": (
        "Keep trying. Everyone falls at first.",
        "You can do it if you practice.",
        "Nobody gets it right the first time.",
    ),
    "skill.practice": (
        "So {H} practiced every day. {he} practiced in the morning, and {he} practiced after lunch.",
        "{H} tried again and again.",
        "Every day, {H} got a little better.",
        "{he} practiced {adv} until the sun went down.",
    ),
    "skill.win": ("One day, {SW}. {H} did it!", "At last, {SW}!", "Then, one {tod}, {SW}."),
    "skill.cheer": ("Look at me! I can do it!", "I did it!", "I never gave up!"),
    "skill.moral": ("practice helps you learn", "you should never give up", "everyone starts as a beginner"),
    # --- a mystery ----------------------------------------------------------------------------------------
    "myst.find": (
        "One day, {H} found {Y} near a {thing}.",
        "While {he} was at {P}, {H} found {Y}.",
        "{H} was playing at {P} when {he} saw {Y}.",
    ),
    "myst.look": (
        "{H} picked it up and looked at it {adv}.",
        "It was {adj} and a little dusty.",
    ),
    "myst.night": (
        "That night, {H} could not stop thinking about the {Yn}.",
        "{H} dreamed about the {Yn} all night.",
    ),
    "myst.show": ("{he} showed it to {Fw}.", "{H} ran to show {Fw}."),
    "myst.what": ("What is it?", "Where did it come from?", "What do we do now?"),
    "myst.answer": ("I don't know. Let's find out!", "Maybe it's magic!", "Let's find out together."),
    "myst.ask": (
        "They asked {Mw}, but {mhe} did not know either.",
        "They looked in a big book at the library, but they found nothing.",
    ),
    "myst.moral": ("the world is full of surprises", "being curious can lead to wonderful things"),
    # --- rescuing an animal --------------------------------------------------------------------------
    "rescue.hear": (
        "At {P}, {H} heard a small sound.",
        "One day, {H} heard a little cry coming from near the {thing}.",
        "{H} was walking through {P} when {he} heard a noise.",
    ),
    "rescue.see": ("{he} looked and saw {R}. It {RT}!", "There was {R}, and it {RT}."),
    "rescue.say": ("Poor little {Rn}! I will help you.", "Don't worry, little {Rn}.", "We have to help it!"),
    "rescue.call": ("Can you help me?", "Please come quick!", "It needs help!"),
    "rescue.name": ("{H} decided to call the {Rn} {RN}.", "{H} gave the {Rn} a name: {RN}."),
    "rescue.care": (
        "They gave the {Rn} some water and a little food.",
        "{H} stroked the {Rn} {adv}.",
        "{H} wrapped the {Rn} in {his} scarf to keep it warm.",
    ),
    "rescue.bye": ("Goodbye, little {Rn}!", "Be safe, little {Rn}!", "Come back and visit!"),
    "rescue.moral": ("we should be kind to all animals", "even small helpers can do big things"),
    # --- being afraid ----------------------------------------------------------------------------------
    "fear.intro": ("{H} was afraid of {Z}.", "There was one thing {H} did not like: {Z}.", "{H} was scared of {Z}."),
    "fear.night": (
        "Every time {he} thought about it, {his} tummy felt funny.",
        "{H} did not even like to talk about it.",
    ),
    "fear.tell": ("One day, {H} told {Mw} about it.", "{H} went to find {Mw}."),
    "fear.breath": ("{H} took a deep breath.", "{H} held {Mw}'s hand tight."),
    "fear.advice": (
        "It's okay to be scared. Being brave means trying anyway.",
        "Let's do it together, one small step at a time.",
        "I will be right here with you.",
    ),
    "fear.after": ("That wasn't scary at all!", "I was brave!", "I'm not scared anymore!"),
    "fear.moral": (
        "being brave does not mean you are never scared",
        "things are often less scary than they seem",
    ),
    # --- a garden -------------------------------------------------------------------------------------
    "garden.plant": (
        "{H} and {his} {M} planted {SE} seeds in the garden.",
        "One spring day, {H} put some tiny {SE} seeds into the ground.",
    ),
    "garden.water": ("Every day, {H} watered them.", "{H} gave them water and pulled out the weeds."),
    "garden.wait": ("But nothing happened.", "Days went by, but the ground was still bare."),
    "garden.when": ("When will they grow?", "Why aren't they growing?", "Did I do something wrong?"),
    "garden.patient": ("Be patient. Good things take time.", "Seeds grow under the ground before we can see them."),
    "garden.check": (
        "Every morning, {H} ran outside to look.",
        "{H} even sang to the seeds, just in case.",
    ),
    "garden.look": ("Look! It's growing!", "They're coming up!", "I see a leaf!"),
    "garden.sprout": (
        "Then one morning, {he} saw a tiny green sprout!",
        "One day, little green leaves poked out of the dirt.",
    ),
    "garden.grow": (
        "By the end of summer, there were {SG} everywhere.",
        "The little plants grew and grew, and soon there were {SG}.",
    ),
    "garden.end": (
        "{H} picked some and shared them with {his} friends.",
        "{H} was so proud of {his} garden.",
        "{H} gave the biggest ones to {his} {M}.",
    ),
    "garden.moral": ("good things come to those who wait", "with care and time, little things grow"),
    # --- baking ---------------------------------------------------------------------------------------
    "bake.want": (
        "One {tod}, {H} and {his} {M} decided to bake {K}.",
        "{H} wanted to bake {K} for {his} friends.",
        "{his} {M} said they could bake {K} together.",
    ),
    "bake.get": (
        "They got out {ingredient}, {ingredient} and {ingredient}.",
        "{H} put on an apron and got the {ingredient} and the {ingredient}.",
        "They needed {ingredient}, {ingredient} and a big bowl.",
    ),
    "bake.mix": (
        "{H} stirred and stirred.",
        "{H} mixed everything {adv} with a wooden spoon.",
        "{H} poured, and {his} {M} stirred.",
    ),
    "bake.oops": ("Oh no!", "Oops!", "What a mess!"),
    "bake.wait": (
        "They waited by the oven, watching through the glass.",
        "{H} licked the spoon while they waited.",
    ),
    "bake.done": (
        "Soon, the kitchen smelled like {K}.",
        "When the timer rang, the {Kn} came out warm and golden.",
        "At last, the {Kn} came out of the oven, warm and golden.",
    ),
    "bake.share": (
        "They shared the {Kn} with {Fw}.",
        "{H} took some to {Fw} next door.",
        "{H} gave the first piece to {Fw}.",
    ),
    "bake.yum": ("Yum! These are so good!", "You made these? They're wonderful!", "Can I have another one?"),
    "bake.moral": ("mistakes are part of learning", "anything is better when you make it together"),
}
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


def document_frequencies(stories: Iterable[str]) -> tuple[Counter, int]:
    """For each word, the number of stories containing it; and the number of stories."""
    counts: Counter = Counter()
    n = 0
    for story in stories:
        counts.update(set(tokenize_words(story)))
        n += 1
    return counts, n


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
