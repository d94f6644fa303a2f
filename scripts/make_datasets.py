"""Generate the small demo and test datasets shipped in ``datasets/``.

Every row is produced from hand-written tables and templates in this file, shuffled with a
seeded ``random.Random``, so the output is identical on every run and on every machine. The
script uses only the standard library and never touches the network.

Files written (see ``datasets/README.md``, which this script also writes):

* ``alpaca.jsonl``: instruction/input/output records whose outputs share one house style:
  a short direct answer followed by a last line ``Key point: <short phrase>.``
* ``vicuna.jsonl``: ShareGPT/Vicuna style multi-turn conversations with follow-ups.
* ``preference.jsonl``: prompt/chosen/rejected pairs over 30 topics, five rejection kinds.
* ``preference_messages.jsonl``: the first 40 preference pairs as full message transcripts.
* ``prompts.jsonl``: short user questions for a PPO stage.
* ``messages.jsonl``: OpenAI style ``messages`` conversations.
* ``arithmetic.jsonl``: two-digit additions with their answers (a verifiable PPO reward).

Usage::

    python scripts/make_datasets.py            # writes into datasets/
    python scripts/make_datasets.py --out DIR  # writes somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 20240601
ROOT = Path(__file__).resolve().parent.parent
KINDS = ("refusal", "rude", "off_topic", "repetitive", "empty_ish")
N_PREFERENCE_MESSAGES = 40

# ---------------------------------------------------------------------------------------------
# Knowledge cards: 30 topics x 8 questions. Each card has a question (Q), a short helpful
# answer (A), a key phrase (K), and optionally an example (E) and a "why" explanation (W) used
# for follow-up turns. Lines that start with whitespace continue the previous line.
# ---------------------------------------------------------------------------------------------
CARDS = """
@ cooking
Q: How can I keep pasta from sticking together?
A: Cook it in a large pot of boiling water and stir it during the first couple of minutes. Toss
    it with sauce soon after draining so the strands stay separate.
K: plenty of water and early stirring
W: At the start, the surface starch on the pasta is sticky, so stirring keeps the pieces apart
    until that outer layer sets.

Q: Why should I let meat rest after cooking?
A: Resting lets the juices settle back through the meat instead of running out when you cut it.
    A steak usually needs about five minutes, while a large roast may need fifteen or more.
K: resting keeps meat juicy
E: For example, if you slice a roast chicken right away, juice pools on the board; after resting
    it for 10 to 15 minutes, far less runs out.

Q: What is the easiest way to chop an onion without crying?
A: Use a very sharp knife and chill the onion for a short while before cutting. A sharp blade
    crushes fewer cells, so less of the irritating gas is released.
K: a sharp knife and a cold onion
W: Cutting an onion releases a gas that stings the eyes, and a cold onion releases it more
    slowly.

Q: How do I know when oil is hot enough for frying?
A: Dip the handle of a wooden spoon into the oil; if small bubbles form around it right away, the
    oil is ready. A kitchen thermometer reading of about 175 to 190 degrees Celsius is the most
    reliable check.
K: steady bubbles mean the oil is ready
E: For example, when you dip the spoon handle into the pan, a ring of tiny bubbles should appear
    within a second or two.

Q: What does it mean to simmer something?
A: Simmering means cooking a liquid just below a full boil, with small bubbles gently rising to
    the surface. It suits soups, stews, and sauces because it cooks food evenly without breaking
    it apart.
K: gentle bubbles below a boil
E: For example, a tomato sauce is brought to a boil and then turned down so it simmers gently for
    twenty minutes.

Q: How should I store fresh parsley?
A: Trim the stems and stand the parsley in a glass of water in the fridge, loosely covered with
    a bag. This keeps it fresh for about a week.
K: stems in water, like flowers
W: The leaves keep drawing water up through the stems, so they stay crisp instead of wilting.

Q: Why do recipes tell you to salt pasta water?
A: Pasta absorbs water as it cooks, so salting the water seasons the pasta from the inside.
    Adding salt at the end only seasons the surface.
K: season the pasta from within

Q: How can I tell if an egg is still fresh?
A: Place it in a bowl of water. A fresh egg sinks and lies flat, while an old egg stands up or
    floats because its air pocket has grown.
K: fresh eggs sink
W: Eggshells are porous, so over time moisture escapes and air gets in, making the air pocket
    inside larger.

@ baking
Q: Why does bread dough need to rise?
A: Yeast in the dough feeds on sugars and releases carbon dioxide gas, which gets trapped and
    makes the dough expand. This is what gives bread its light, airy texture.
K: yeast gas makes bread light
E: For example, a basic sandwich loaf often doubles in size during a first rise of about an hour
    in a warm kitchen.

Q: What is the difference between baking soda and baking powder?
A: Baking soda is a base that needs an acid, such as buttermilk or lemon juice, to make bubbles.
    Baking powder already contains both a base and an acid, so it only needs moisture and heat.
K: baking powder brings its own acid
E: For example, buttermilk pancakes often use baking soda, while pancakes made with plain milk
    usually rely on baking powder.

Q: Why should I preheat the oven before baking?
A: Baked goods need the right temperature from the first minute to rise and set properly. If the
    oven starts cold, cakes and cookies can spread, sink, or bake unevenly.
K: the right heat from the start

Q: How do I know when a cake is done?
A: Push a toothpick or thin skewer into the center; if it comes out clean or with a few dry
    crumbs, the cake is ready. The top should also spring back when pressed lightly.
K: a clean toothpick from the center
W: The center is the last part to cook, so once it is set, the rest of the cake is done too.

Q: Why do cookie recipes often say to chill the dough?
A: Chilling firms up the butter, so the cookies spread less in the oven and stay thicker. It also
    gives the flavors time to blend.
K: cold dough spreads less
E: For example, chocolate chip cookie dough chilled for an hour bakes into thicker, chewier
    cookies than dough baked right away.

Q: What does it mean to knead dough?
A: Kneading means pressing, folding, and turning dough over and over with your hands. This builds
    gluten, which makes the dough stretchy and strong enough to hold gas.
K: kneading builds gluten
W: Gluten forms when flour proteins meet water and are worked, and that stretchy network traps
    the gas made by the yeast.

Q: Why did my muffins come out tough?
A: The most common cause is overmixing the batter, which develops too much gluten. Stir just
    until the dry ingredients are moistened, even if a few lumps remain.
K: mix muffin batter briefly

Q: Can I use butter instead of oil in a cake recipe?
A: Usually yes, if you melt the butter and use about the same amount or slightly more. The cake
    will taste richer, though it may be a little less moist than one made with oil.
K: melted butter can replace oil
W: Oil stays liquid at room temperature while butter firms up, so a cake made with oil feels
    softer and moister.

@ nutrition
Q: Why is fiber good for you?
A: Fiber helps keep digestion regular and makes you feel full for longer. It is found in foods
    like beans, oats, whole grains, fruit, and vegetables.
K: fiber supports digestion
E: For example, swapping white bread for whole grain bread and adding a handful of beans to a
    salad both raise your daily fiber.

Q: What are proteins used for in the body?
A: Proteins are building blocks for muscles, skin, and organs, and they help make enzymes and
    hormones. Good sources include eggs, fish, beans, lentils, dairy, and meat.
K: protein builds and repairs the body

Q: Why do people say to drink enough water?
A: Water helps control body temperature, carries nutrients, and removes waste. Even mild
    dehydration can cause tiredness and headaches.
K: water keeps the body running
W: Your body loses water all the time through breathing, sweating, and going to the toilet, so
    it needs to be replaced every day.

Q: What is a good source of vitamin C?
A: Citrus fruits such as oranges and lemons are well-known sources, and so are strawberries,
    kiwis, and bell peppers. Vitamin C helps the body heal wounds and absorb iron.
K: fruit and peppers provide vitamin C
E: For example, one medium orange provides most of the vitamin C an adult needs in a day.

Q: What are whole grains?
A: Whole grains keep all three parts of the grain kernel: the bran, the germ, and the endosperm.
    Examples include brown rice, oats, and whole wheat, and they contain more fiber than refined
    grains.
K: the whole kernel is kept
E: For example, brown rice is a whole grain, while white rice has had its bran and germ removed.

Q: Why is calcium important?
A: Calcium helps build strong bones and teeth, and it also plays a role in muscle movement and
    nerve signals. Dairy products, fortified plant milks, and leafy greens are common sources.
K: calcium keeps bones strong

Q: Is it bad to skip breakfast?
A: Not necessarily; what matters most is your overall eating pattern across the day. Some people
    feel better with breakfast, while others are fine eating later.
K: the whole day's diet matters most
W: For healthy adults, the total nutrition over the day counts far more than the time of the
    first meal, so it is largely a personal choice.

Q: What does a balanced plate look like?
A: A simple guide is to fill half the plate with vegetables and fruit, a quarter with whole
    grains, and a quarter with protein. Add a little healthy fat and drink water with the meal.
K: half the plate vegetables and fruit
E: For example, a balanced dinner might be grilled fish, brown rice, and a large side of salad
    with roasted carrots.

@ fitness
Q: Why should I warm up before exercising?
A: A warm-up raises your heart rate and body temperature and loosens your muscles. This helps you
    move better and lowers the chance of strains.
K: warm muscles work better
E: For example, before a run you might walk briskly for three minutes and then do leg swings and
    a few minutes of easy jogging.

Q: How often should adults exercise?
A: Health guidelines commonly suggest at least 150 minutes of moderate activity a week, plus
    muscle-strengthening exercises on two or more days. Even short walks add up.
K: about 150 minutes a week
E: For example, thirty minutes of brisk walking on five days a week adds up to 150 minutes.

Q: What is the difference between cardio and strength training?
A: Cardio, like running or cycling, mainly trains your heart and lungs. Strength training, like
    lifting weights or doing push-ups, mainly builds muscle and bone strength.
K: heart and lungs versus muscles

Q: Why do muscles feel sore a day or two after a workout?
A: Hard or unfamiliar exercise causes tiny damage in muscle fibers, and the repair process brings
    soreness. It usually fades within a few days and lessens as your body gets used to the
    activity.
K: soreness is muscles repairing
W: The body responds to the small damage by rebuilding the fibers, which is also how muscles get
    stronger over time.

Q: Is stretching better before or after exercise?
A: Gentle moving stretches, like leg swings, suit a warm-up, while longer held stretches are
    often done afterward. Holding a stretch usually feels easier when muscles are warm.
K: moving stretches before, held stretches after

Q: How can I start running if I am a beginner?
A: Begin with short sessions that mix walking and easy jogging, and add a little more running
    each week. Go at a pace where you could still hold a conversation.
K: mix walking and jogging at first
E: For example, you might jog for one minute and walk for two minutes, repeated eight times,
    three days a week.

Q: Why is rest important in a training plan?
A: Muscles rebuild and get stronger during rest, not during the workout itself. Without rest
    days, fatigue builds up and the risk of injury rises.
K: muscles grow stronger during rest

Q: What is a plank exercise?
A: A plank means holding your body in a straight line, supported on your forearms and toes,
    without letting your hips sag. It strengthens the core muscles around your stomach and back.
K: a straight, steady body line
E: For example, a beginner might hold a plank for 20 seconds, rest, and repeat three times.

@ sleep
Q: How much sleep does an adult need?
A: Most adults need about seven to nine hours of sleep a night. Regularly getting less can affect
    mood, focus, and health.
K: seven to nine hours a night
W: During sleep the brain sorts memories and the body repairs itself, and that takes several
    full sleep cycles.

Q: Why does looking at screens before bed make it harder to sleep?
A: Bright screens and engaging content keep the brain alert, and the light can delay the release
    of melatonin, the hormone that makes us sleepy. Putting devices away before bed helps.
K: screens keep the brain alert
E: For example, reading a paper book for the last half hour before bed instead of scrolling can
    make it easier to drift off.

Q: What is a good bedtime routine?
A: Go to bed at a similar time each night and repeat the same calming steps, such as dimming the
    lights, taking a warm shower, or reading. A steady routine tells your body that sleep is
    coming.
K: the same calming steps each night

Q: Is it okay to take naps during the day?
A: Short naps of about 20 minutes can boost alertness without leaving you groggy. Long or
    late-afternoon naps may make it harder to fall asleep at night.
K: keep naps short and early
W: Longer naps can carry you into deep sleep, and waking from deep sleep often leaves you feeling
    groggy.

Q: Why is caffeine bad for sleep?
A: Caffeine blocks adenosine, a brain chemical that builds up during the day and makes us feel
    sleepy. Its effects last several hours, so coffee in the late afternoon can keep you awake
    at night.
K: caffeine blocks sleepiness for hours
E: For example, many people avoid coffee, strong tea, and energy drinks after about 2 p.m. to
    protect their sleep.

Q: What makes a bedroom good for sleeping?
A: A good sleep room is dark, quiet, and slightly cool, with a comfortable mattress and pillow.
    Keeping work and screens out of the bedroom also helps.
K: dark, quiet, and cool

Q: What should I do if I cannot fall asleep?
A: If you are still awake after about twenty minutes, get up and do something quiet in dim light
    until you feel sleepy. Lying in bed feeling frustrated can make the problem worse.
K: get up and reset when restless
W: It stops your brain from linking the bed with lying awake and worrying.

Q: Why do we dream?
A: Scientists are still not sure, but most vivid dreams happen during REM sleep and may help us
    process emotions and memories. Many researchers link dreaming to how the brain sorts
    information.
K: dreams may help process memories

@ gardening
Q: How often should I water vegetable plants?
A: Most vegetables do well with a deep watering a few times a week rather than a light sprinkle
    every day. Check the soil: if it is dry a few centimeters down, it is time to water.
K: water deeply, not daily
W: Deep watering encourages roots to grow downward, which makes plants sturdier during dry
    spells.

Q: What is compost?
A: Compost is decayed organic material, such as vegetable scraps, leaves, and grass clippings,
    that has broken down into dark, crumbly matter. Adding it to the garden feeds plants and
    improves the soil.
K: recycled scraps that feed the soil
E: For example, a compost bin can turn banana peels, coffee grounds, and eggshells into garden
    compost within a few months.

Q: When is the best time of day to water a garden?
A: Early morning is usually best, because less water evaporates and the leaves dry during the
    day. Watering in the evening can leave leaves wet overnight, which may encourage disease.
K: water in the early morning

Q: Why do gardeners use mulch?
A: Mulch is a layer of material such as bark or straw spread over the soil. It holds in moisture,
    keeps the soil temperature steady, and blocks many weeds.
K: mulch keeps soil moist
E: For example, spreading a few centimeters of straw around tomato plants keeps the soil damp
    between waterings.

Q: What does it mean to prune a plant?
A: Pruning means cutting off selected branches or stems, such as dead, damaged, or crowded ones.
    It keeps plants healthy and can encourage new growth and more flowers.
K: cut away to help it grow
W: Removing dead or crowded parts lets the plant put its energy into healthy growth and lets
    light and air reach the center.

Q: Which vegetables are easy for beginners to grow?
A: Lettuce, radishes, zucchini, and bush beans are forgiving choices for new gardeners. They grow
    quickly and do not need special care.
K: start with fast, forgiving crops
E: For example, radishes can be ready to pick about four weeks after sowing.

Q: How much sunlight do most vegetables need?
A: Fruiting vegetables such as tomatoes and peppers need at least six to eight hours of direct
    sun a day. Leafy greens can manage with a little less.
K: six or more hours of sun

Q: What is crop rotation?
A: Crop rotation means growing a different plant family in a bed each year instead of the same
    crop. It stops soil pests and diseases from building up and balances how nutrients are used.
K: change crops each season
W: Pests that feed on one plant family lose their food source when a different family is planted
    there.

@ houseplants
Q: Why are the leaves on my houseplant turning yellow?
A: Overwatering is the most common cause, because soggy soil harms the roots. Check that the pot
    drains well and let the top layer of soil dry before watering again.
K: yellow leaves often mean too much water
W: Roots need air as well as water, and constantly wet soil pushes the air out, so the roots
    start to rot.

Q: Which houseplants are easy to keep alive?
A: Snake plants, pothos, and ZZ plants are very forgiving. They tolerate low light and can handle
    the occasional missed watering.
K: choose tough, low-light plants

Q: How do I know when to water a houseplant?
A: Push a finger into the soil about two to three centimeters deep; if it feels dry, water
    thoroughly until water drains out of the bottom. Most plants prefer this to small daily sips.
K: check the soil with your finger
E: For example, a pothos in a medium pot might need water about once a week in summer and less
    often in winter.

Q: Why do pots need drainage holes?
A: Drainage holes let extra water escape so it does not collect around the roots. Without them,
    the soil stays soggy and the roots can rot.
K: extra water must escape

Q: Do houseplants need fertilizer?
A: Yes, most benefit from a diluted fertilizer in spring and summer, when they are actively
    growing. In winter growth slows, so feeding can usually stop.
K: feed during the growing season
W: Potting soil runs out of nutrients over time, and a potted plant cannot reach new soil the way
    a garden plant can.

Q: Why is my plant leaning toward the window?
A: Plants grow toward light, a response called phototropism. Turning the pot a quarter turn every
    week or so keeps the growth even.
K: plants bend toward light
E: For example, a basil pot on a kitchen windowsill will lean sideways within a week or two if
    it is never turned.

Q: When should I repot a houseplant?
A: Repot when roots grow out of the drainage holes or circle tightly around the pot, often every
    one to two years. Choose a new pot only slightly bigger than the old one.
K: repot when roots run out of room

Q: Can houseplants grow under artificial light?
A: Yes, many houseplants grow well under LED grow lights, which give off the light plants use for
    photosynthesis. Most do well with the lights on for about twelve to fourteen hours a day.
K: grow lights can stand in for sunshine

@ pets
Q: How often should I walk my dog?
A: Most dogs need at least one or two walks a day, though the right amount depends on breed, age,
    and health. Active breeds often need extra exercise and play.
K: daily walks suited to the dog
E: For example, a young border collie may need well over an hour of activity a day, while an
    older small dog may be happy with two short strolls.

Q: Why do cats purr?
A: Cats often purr when they are relaxed and content, but they also purr when stressed or unwell.
    Purring seems to be a way of calming themselves and communicating.
K: purring can mean comfort or self-soothing

Q: Why is chocolate dangerous for dogs?
A: Chocolate contains theobromine, which dogs break down very slowly, so it can build up to toxic
    levels. Dark chocolate is the most dangerous, and you should call a vet if a dog eats some.
K: theobromine is toxic to dogs

Q: How can I help a new cat settle into my home?
A: Start the cat in one quiet room with food, water, a litter box, and a hiding spot. Let it
    explore the rest of the house gradually, at its own pace.
K: one quiet room first
W: A whole new house is overwhelming, and a small safe space lets the cat build confidence before
    facing more.

Q: How often should a pet visit the vet?
A: Healthy adult cats and dogs usually need a checkup once a year, while puppies, kittens, and
    older pets need more frequent visits. Regular checkups catch problems early.
K: yearly checkups for healthy adults

Q: What is the best way to train a puppy?
A: Use short, frequent sessions and reward good behavior right away with treats or praise. Be
    consistent with words and rules so the puppy learns quickly.
K: reward good behavior right away
E: For example, say "sit" once, and the moment the puppy sits, give a small treat and praise.

Q: Why do dogs wag their tails?
A: Tail wagging is a form of communication. A loose, wide wag usually signals friendliness, while
    a stiff, high wag can mean the dog is alert or tense.
K: wagging is body language

Q: What should I feed a pet rabbit?
A: Rabbits should eat mostly hay, with fresh leafy greens every day and a small portion of
    pellets. They also need constant access to fresh water.
K: hay is the main food for rabbits
W: Hay gives the fiber a rabbit's gut needs and wears down its teeth, which never stop growing.

@ birds
Q: Why do some birds migrate?
A: Many birds migrate to follow food supplies and good breeding conditions as the seasons change.
    They fly to warmer places for winter and return when food is plentiful again.
K: birds follow food with the seasons
E: For example, barn swallows breed in Europe in summer and spend the winter in southern Africa.

Q: How do birds fly?
A: Birds flap their wings to push air down and back, which creates lift and forward thrust.
    Hollow bones and strong chest muscles make flying easier.
K: wings create lift and thrust

Q: Why do birds sing in the morning?
A: The dawn chorus is mostly males singing to defend their territory and attract mates. Calm,
    quiet morning air also helps their songs carry farther.
K: morning songs claim territory

Q: What should I put in a bird feeder?
A: Sunflower seeds are popular with many garden birds, and suet is useful in cold weather. Avoid
    bread and salty foods, and keep the feeder clean.
K: seeds and suet, not bread
W: Bread fills birds up without giving them the fat and protein they need.

Q: How do penguins stay warm?
A: Penguins have tightly packed waterproof feathers and a thick layer of fat under their skin.
    Emperor penguins also huddle together in large groups to share warmth.
K: feathers, fat, and huddling
E: For example, emperor penguins take turns moving into the warm center of the huddle during
    winter storms.

Q: Why do owls hunt at night?
A: Many owls are built for darkness, with large eyes that gather light and excellent hearing.
    Hunting at night lets them catch mice and other animals that are active then.
K: owls are built for darkness

Q: What is the fastest bird?
A: The peregrine falcon is the fastest bird, reaching over 300 kilometers per hour when it dives
    to catch prey. It folds its wings and drops steeply, a move called a stoop.
K: the diving peregrine falcon

Q: How do birds build nests?
A: Birds weave or pile materials like twigs, grass, mud, and feathers into a shape that holds
    their eggs safely. Each species has its own style, from cups to hanging pouches.
K: each species builds its own way
E: For example, American robins build cup-shaped nests lined with mud, while weaver birds knot
    grass into hanging nests.

@ insects
Q: Why are bees important?
A: Bees pollinate many crops and wild plants by carrying pollen from flower to flower. Without
    them, many fruits, nuts, and vegetables would be much harder to grow.
K: bees pollinate our food
E: For example, apple, cherry, and almond trees all depend heavily on bees for a good harvest.

Q: How many legs does an insect have?
A: Every adult insect has six legs attached to the middle part of its body, called the thorax.
    Spiders have eight legs, so they are not insects.
K: insects have six legs

Q: How does a caterpillar become a butterfly?
A: A caterpillar eats and grows, then forms a protective case called a chrysalis. Inside it, its
    body is rebuilt and it comes out as a butterfly; this process is called metamorphosis.
K: metamorphosis inside a chrysalis

Q: Why are mosquitoes attracted to people?
A: Mosquitoes detect the carbon dioxide we breathe out, along with body heat and skin odors. Only
    female mosquitoes bite, because they need blood to produce eggs.
K: breath, heat, and scent attract them
W: The carbon dioxide in our breath spreads through the air, so mosquitoes can follow it from a
    distance.

Q: How do ants find their way back to the nest?
A: Many ants leave chemical trails called pheromones that other ants can follow. Some also use
    the position of the sun and keep track of their steps.
K: ants follow scent trails
E: For example, when one ant finds spilled sugar, a line of ants soon follows the same path to it.

Q: Why do fireflies glow?
A: Fireflies make light through a chemical reaction in their bodies called bioluminescence. They
    flash in patterns to attract mates.
K: chemical light for finding mates

Q: Are spiders insects?
A: No, spiders are arachnids. They have eight legs and two main body parts, while insects have
    six legs and three body parts.
K: spiders are arachnids

Q: Why do moths fly toward lights?
A: Scientists think artificial lights confuse the way moths steer, since they tend to keep their
    backs toward the brightest part of the sky. Near a lamp, this makes them tilt and circle.
K: lights confuse moth navigation

@ oceans
Q: Why is the sea salty?
A: Rain slowly wears down rocks on land, and rivers carry the dissolved minerals into the sea.
    When seawater evaporates the salt stays behind, so it has built up over millions of years.
K: minerals from rocks collect in the sea

Q: What causes ocean tides?
A: Tides are caused mainly by the Moon's gravity pulling on Earth's oceans, with help from the
    Sun. Many coasts see two high tides and two low tides each day.
K: the Moon's pull causes tides
E: For example, at full moon and new moon the Sun and Moon line up, producing extra-large spring
    tides.

Q: Which is the largest ocean?
A: The Pacific Ocean is the largest and deepest ocean on Earth. It covers roughly a third of the
    planet's surface.
K: the Pacific is the largest

Q: What is a coral reef?
A: A coral reef is a structure built by tiny animals called coral polyps, which make hard
    skeletons of calcium carbonate. Reefs shelter a huge variety of fish and other sea life.
K: reefs are built by tiny animals
E: For example, the Great Barrier Reef off northeastern Australia is the largest coral reef
    system in the world.

Q: Why do waves form in the ocean?
A: Most waves are created by wind blowing across the water and passing its energy to the
    surface. Stronger winds blowing over longer distances make bigger waves.
K: wind makes waves
W: Moving air drags on the water and pushes the surface into ripples, which grow as the wind
    keeps adding energy.

Q: How deep is the ocean?
A: The average depth of the ocean is about 3,700 meters. The deepest known point, the Challenger
    Deep in the Mariana Trench, is nearly 11,000 meters down.
K: about 3.7 kilometers on average

Q: Why do whales come to the surface?
A: Whales are mammals, so they breathe air with lungs rather than gills. They surface to breathe
    out through their blowholes and take in fresh air.
K: whales breathe air

Q: Why is the ocean blue?
A: Water absorbs red and other long-wavelength light more strongly than blue light. The blue
    light is scattered back toward our eyes, so deep, clear water looks blue.
K: water absorbs red light

@ weather
Q: What causes rain?
A: Warm air carries water vapor upward, where it cools and condenses into tiny droplets that form
    clouds. When the droplets join and grow heavy enough, they fall as rain.
K: cooled vapor falls as drops

Q: How does a rainbow form?
A: A rainbow appears when sunlight enters raindrops, bends, reflects inside them, and splits into
    its colors. You see one when the sun is behind you and rain is in front of you.
K: raindrops split sunlight
E: For example, you often see a rainbow in the late afternoon when a shower passes and the low
    sun shines from behind you.

Q: What is the difference between weather and climate?
A: Weather is the state of the air over hours or days, such as a rainy afternoon. Climate is the
    average pattern of weather in a place over many years.
K: weather is short-term, climate is long-term
E: For example, one cold week in July is weather, while a region's usually hot, dry summers are
    part of its climate.

Q: Why does thunder follow lightning?
A: Lightning heats the air so quickly that it expands with a bang, which we hear as thunder.
    Light travels much faster than sound, so we see the flash first.
K: light arrives before sound
W: Light arrives almost instantly over short distances, but sound needs about three seconds to
    travel one kilometer.

Q: What is humidity?
A: Humidity is the amount of water vapor in the air. High humidity makes hot days feel stickier
    because sweat evaporates more slowly.
K: water vapor in the air
W: Sweat cools you by evaporating, and air that is already damp takes up extra moisture more
    slowly.

Q: How do hurricanes form?
A: Hurricanes form over warm ocean water, where rising moist air releases heat and builds a
    spinning storm. They weaken when they move over land or cooler water.
K: warm ocean water fuels hurricanes

Q: Why is it colder on mountaintops?
A: Air expands and cools as it rises, so temperatures usually drop with height, on average about
    6.5 degrees Celsius for every kilometer. The thin air at the top also holds less heat.
K: air cools as it rises

Q: What is fog?
A: Fog is a cloud at ground level that forms when moist air cools enough for its water vapor to
    condense into tiny droplets. It often appears after calm, clear nights or over cool water.
K: fog is a cloud near the ground
E: For example, valleys often fill with fog on cool autumn mornings after a clear night.

@ astronomy
Q: Why does the Moon change shape during the month?
A: The Moon does not really change shape; we see different amounts of its sunlit side as it
    orbits Earth. This cycle of phases takes about 29.5 days.
K: we see different sunlit parts
E: For example, at full moon the Moon is on the far side of Earth from the Sun, so its whole lit
    face points toward us.

Q: What is a light-year?
A: A light-year is a distance, not a time: it is how far light travels in one year, about 9.5
    trillion kilometers. Astronomers use it because distances in space are enormous.
K: a light-year measures distance
E: For example, Proxima Centauri, the nearest star to the Sun, is about 4.2 light-years away.

Q: Why is Mars called the red planet?
A: Mars looks red because its surface is covered in dust rich in iron oxide, which is basically
    rust. Winds also lift the dust into its thin atmosphere, tinting the sky.
K: rusty dust makes Mars red

Q: What causes the seasons on Earth?
A: Seasons happen because Earth's axis is tilted by about 23.5 degrees. As Earth orbits the Sun,
    each hemisphere takes turns leaning toward the Sun and getting more direct sunlight.
K: Earth's tilt causes the seasons
W: When your hemisphere tilts toward the Sun, sunlight hits it more directly and days are
    longer, so it warms up.

Q: What is a shooting star?
A: A shooting star is not a star at all but a meteor: a small piece of space rock burning up as
    it rushes through Earth's atmosphere. Most are no bigger than a grain of sand.
K: a meteor burning up in the air
E: For example, during the Perseid meteor shower in August, you can see dozens of meteors an hour
    from a dark place.

Q: Which is the largest planet in our solar system?
A: Jupiter is the largest planet, with a diameter about eleven times that of Earth. It is a gas
    giant made mostly of hydrogen and helium.
K: Jupiter is the largest

Q: Why do stars twinkle?
A: Stars twinkle because their light passes through moving layers of air in Earth's atmosphere,
    which bend it slightly in changing directions. Seen from space, stars shine steadily.
K: moving air makes stars twinkle

Q: What is a solar eclipse?
A: A solar eclipse happens when the Moon passes between the Sun and Earth, blocking some or all
    of the Sun's light. Never look at one directly without proper eclipse glasses.
K: the Moon blocks the Sun
W: Even when most of the Sun is covered, the uncovered part is still bright enough to damage your
    eyes, so protection is essential.

@ geology
Q: What causes earthquakes?
A: Most earthquakes happen when huge plates of Earth's crust slip past each other along faults.
    Stress builds up over time and is released suddenly, shaking the ground.
K: slipping plates release stress

Q: How are volcanoes formed?
A: Volcanoes form where melted rock, called magma, rises through cracks in Earth's crust. Over
    many eruptions, lava and ash pile up into a mountain.
K: rising magma builds volcanoes
E: For example, the Hawaiian islands were built by volcanoes that erupted again and again over a
    hot spot.

Q: What are the three main types of rock?
A: The three main types are igneous, sedimentary, and metamorphic. Igneous rock forms from cooled
    magma, sedimentary rock from pressed layers, and metamorphic rock from rock changed by heat
    and pressure.
K: igneous, sedimentary, metamorphic
E: For example, granite is igneous, sandstone is sedimentary, and marble is metamorphic.

Q: How do fossils form?
A: Fossils usually form when a plant or animal is buried quickly in mud or sand. Over a very long
    time, minerals replace or preserve its remains as the layers harden into rock.
K: quick burial preserves remains

Q: Why do caves form?
A: Many caves form when slightly acidic rainwater slowly dissolves limestone underground. Over
    thousands of years, small cracks widen into tunnels and chambers.
K: water dissolves limestone
W: Rainwater picks up carbon dioxide, which makes a weak acid that reacts with the limestone.

Q: What is the difference between magma and lava?
A: Magma is melted rock while it is still underground. Once it erupts onto the surface, it is
    called lava.
K: lava is magma above ground

Q: How are mountains formed?
A: Many mountains form when tectonic plates push into each other and the crust folds and lifts.
    The Himalayas, for example, are still rising as India pushes into Asia.
K: colliding plates lift mountains

Q: What is erosion?
A: Erosion is the wearing away and moving of rock and soil by water, wind, or ice. Over a long
    time it can carve valleys, canyons, and coastlines.
K: nature wears the land away
E: For example, the Colorado River carved the Grand Canyon over millions of years.

@ physics
Q: Why do objects fall to the ground?
A: Objects fall because gravity pulls them toward the center of Earth. Without air resistance,
    all objects would fall at the same rate regardless of their weight.
K: gravity pulls everything down
E: For example, an astronaut on the Moon dropped a hammer and a feather together, and both landed
    at the same moment because there is no air there.

Q: What is friction?
A: Friction is a force that resists two surfaces sliding against each other. It helps shoes grip
    the ground, but it also wears parts down and turns motion into heat.
K: friction resists sliding
E: For example, rubbing your hands together quickly makes them warm because friction turns the
    motion into heat.

Q: Why does a metal spoon feel colder than a wooden one?
A: Both may be the same temperature, but metal carries heat away from your hand much faster. Your
    skin senses that quick heat loss as cold.
K: metal moves heat faster

Q: What is the speed of light?
A: Light travels at about 300,000 kilometers per second in a vacuum. At that speed, sunlight
    takes a little over eight minutes to reach Earth.
K: about 300,000 km per second

Q: Why do boats float?
A: A boat floats when it pushes aside a weight of water equal to its own weight. Its hollow shape
    lets it move a lot of water without being very heavy.
K: displaced water holds boats up
W: The water pushes back up with a force equal to the weight of the water moved aside, and this
    upward push is called buoyancy.

Q: What is energy?
A: Energy is the ability to do work or cause change, such as moving, heating, or lighting
    something. It cannot be created or destroyed, only changed from one form into another.
K: energy changes form
E: For example, a solar panel changes light energy into electrical energy.

Q: Why does sound travel faster in water than in air?
A: Sound is a vibration passed from particle to particle, and water passes it along much more
    effectively than air. Sound moves about four times faster in water than in air.
K: water passes vibrations faster

Q: What is a magnet?
A: A magnet is an object that produces a magnetic field, which pulls on iron and some other
    metals. Every magnet has a north and a south pole, and opposite poles attract.
K: opposite poles attract

@ chemistry
Q: What is an atom?
A: An atom is the smallest unit of a chemical element. It has a nucleus of protons and neutrons,
    surrounded by electrons.
K: atoms build all matter
E: For example, a water molecule is made of two hydrogen atoms and one oxygen atom.

Q: Why does iron rust?
A: Iron rusts when it reacts with oxygen and water to form iron oxide. Salt speeds up the
    reaction, which is why cars rust faster where roads are salted in winter.
K: iron plus oxygen and water

Q: What is the difference between a mixture and a compound?
A: In a mixture, substances are combined but keep their own properties and can often be separated
    easily. In a compound, elements are chemically bonded into a new substance.
K: compounds are chemically bonded
E: For example, salt stirred into sand is a mixture, while table salt itself is a compound of
    sodium and chlorine.

Q: What does pH measure?
A: pH measures how acidic or basic a solution is, on a scale that usually runs from 0 to 14. A pH
    of 7 is neutral, lower numbers are acidic, and higher numbers are basic.
K: 7 is neutral
E: For example, lemon juice has a pH of about 2, while baking soda dissolved in water is around
    8 or 9.

Q: Why does ice float on water?
A: Water expands when it freezes, because its molecules lock into an open crystal pattern. That
    makes ice less dense than liquid water, so it floats.
K: ice is less dense than water

Q: What happens when you mix vinegar and baking soda?
A: The acid in vinegar reacts with the baking soda, which is a base, to produce carbon dioxide
    gas. The fizzing you see is that gas escaping.
K: acid plus base makes gas

Q: What is a chemical reaction?
A: A chemical reaction is a process in which substances change into new substances with different
    properties. Signs include gas bubbles, color changes, heat, or light.
K: new substances form
E: For example, burning wood is a chemical reaction that produces ash, smoke, heat, and light.

Q: Why does salt melt ice on roads?
A: Salt dissolves into the thin layer of water on the ice and lowers its freezing point. The ice
    then melts even when the air is a little below zero degrees Celsius.
K: salt lowers the freezing point

@ human body
Q: What does the heart do?
A: The heart is a muscle that pumps blood through the body. The blood carries oxygen and
    nutrients to the cells and takes away waste.
K: the heart pumps blood
E: For example, at rest an adult heart usually beats about 60 to 100 times a minute.

Q: Why do we sweat?
A: Sweating cools the body. When sweat evaporates from the skin, it takes heat with it, which
    helps keep your temperature steady.
K: evaporation cools the skin

Q: How many bones are in the adult human body?
A: An adult human body has 206 bones. Babies are born with more, but some of them fuse together
    as the child grows.
K: adults have 206 bones

Q: Why do we get goosebumps?
A: Goosebumps happen when tiny muscles at the base of the hairs tighten and make the hairs stand
    up. It is a reflex to cold or strong emotion left over from our furrier ancestors.
K: tiny muscles lift the hairs
W: In animals with thick fur, raised hair traps a layer of warm air or makes them look bigger to
    a threat.

Q: What do the lungs do?
A: The lungs bring oxygen into the body and remove carbon dioxide. Inside them, millions of tiny
    air sacs pass oxygen into the blood.
K: lungs swap oxygen and carbon dioxide

Q: Why do we yawn?
A: Scientists are not completely sure, but yawning may help cool the brain and increase
    alertness. It often happens when we are tired or bored, or when we see someone else yawn.
K: yawning may cool and wake the brain

Q: What is the largest organ of the human body?
A: The skin is the largest organ. It protects the body from germs, helps control temperature,
    and lets us feel touch, heat, and pain.
K: the skin is the largest organ
E: For example, when you are too hot, blood vessels in your skin widen to release heat.

Q: Why does the body need iron?
A: Iron helps red blood cells carry oxygen around the body. Too little iron can lead to anemia,
    which causes tiredness and weakness.
K: iron helps blood carry oxygen
E: For example, lentils, spinach, beans, and red meat are all good sources of iron.

@ computers
Q: What is the difference between RAM and storage?
A: RAM is short-term memory the computer uses for programs that are running right now, and it is
    cleared when the power goes off. Storage, like an SSD, keeps your files saved permanently.
K: RAM is working memory
E: For example, an open document lives in RAM while you edit it, and it is written to storage
    when you click save.

Q: Why does restarting a computer often fix problems?
A: Restarting clears the computer's working memory and closes stuck programs, so everything
    starts fresh. Many temporary glitches disappear after that clean start.
K: a restart gives a clean slate

Q: What is a CPU?
A: The CPU, or central processing unit, is the chip that carries out a computer's instructions.
    It does the calculations and decides what the computer does next.
K: the CPU follows instructions

Q: What is cloud storage?
A: Cloud storage means keeping your files on a company's servers over the internet instead of
    only on your own device. You can reach them from any device where you sign in.
K: your files on internet servers
E: For example, a photo saved to cloud storage from your phone can be opened later on your
    laptop.

Q: Why should I back up my files?
A: Devices can break, get lost, or be hit by malware, and a backup means your files survive. A
    good habit is to keep at least one copy in a different place.
K: keep a second copy elsewhere
E: For example, you could copy important folders to an external drive every week and also keep
    them in cloud storage.

Q: What is an operating system?
A: An operating system is the main software that manages a computer's hardware and runs other
    programs. Windows, macOS, and Linux are common examples.
K: the OS runs everything else

Q: Why does my computer slow down over time?
A: Common causes include too many programs starting automatically, a nearly full drive, and
    outdated software. Removing unused apps and freeing up space often helps.
K: trim startup apps and free up space

Q: What does a keyboard shortcut do?
A: A keyboard shortcut is a key combination that performs an action quickly without the mouse.
    Learning a few common ones can save a lot of time.
K: shortcuts save time
E: For example, Ctrl+C copies and Ctrl+V pastes on Windows, while Mac users press Command
    instead of Ctrl.

@ programming
Q: What is a variable in programming?
A: A variable is a named place to store a value, like a number or a piece of text, so the program
    can use it later. Its value can usually change as the program runs.
K: a named box for a value
E: For example, in Python, writing score = 10 creates a variable named score that holds the
    number 10.

Q: What is a loop?
A: A loop repeats a block of code, either a set number of times or until a condition is met. It
    saves you from writing the same instructions over and over.
K: loops repeat code
E: For example, a loop can print the numbers from 1 to 100 with just two lines of code.

Q: What is a bug in software?
A: A bug is a mistake in a program that makes it behave in an unexpected or wrong way. Finding
    and fixing bugs is called debugging.
K: bugs are mistakes in code

Q: Why do programmers write comments in code?
A: Comments explain what the code does and why, in plain language. They help other people, and
    your future self, understand the code more quickly.
K: comments explain the why

Q: What is a function in programming?
A: A function is a named, reusable block of code that performs a specific task. You can give it
    inputs, and it can return a result.
K: reusable named code
E: For example, a function called add could take two numbers and return their sum.

Q: What is version control?
A: Version control is a system that records changes to files over time, so you can see the
    history and go back to earlier versions. Git is the most widely used tool for it.
K: track every change
W: It lets several people work on the same code safely and makes it easy to undo a mistake.

Q: Which programming language should a beginner learn first?
A: Python is a popular first choice because its syntax is clear and readable, and it is used in
    many fields. JavaScript is also a good option if you want to build websites.
K: start with a readable language

Q: What is an algorithm?
A: An algorithm is a clear, step-by-step set of instructions for solving a problem or completing a
    task. Computers follow algorithms to sort data, search, and much more.
K: step-by-step instructions
E: For example, a recipe for baking bread is an everyday algorithm.

@ internet safety
Q: What makes a strong password?
A: A strong password is long, unique to one account, and hard to guess, such as a phrase made of
    several random words. A password manager can create and remember them for you.
K: long and unique for each account
W: If one site is breached, a unique password stops attackers from using it to get into your
    other accounts.

Q: What is phishing?
A: Phishing is a trick where someone pretends to be a trusted company or person to get your
    passwords or money. It often comes as an urgent email or text message with a link.
K: fake messages that steal details
E: For example, a text saying your parcel is held and asking you to pay a small fee through a
    link is a common phishing scam.

Q: What is two-factor authentication?
A: Two-factor authentication adds a second check when you log in, such as a code from an app, on
    top of your password. Even if someone steals your password, they usually still cannot get in.
K: a second check beyond the password

Q: Is it safe to use public Wi-Fi?
A: It is usually fine for general browsing, especially on sites that use HTTPS, but be careful
    with sensitive tasks. Avoid banking on unknown networks, or use a trusted VPN.
K: be careful with sensitive tasks

Q: Why should I update my apps and devices?
A: Updates often fix security holes that attackers could use to break in. Turning on automatic
    updates is one of the easiest ways to stay safe.
K: updates close security holes

Q: How can I tell if a website is secure?
A: Check that the address starts with https and that the site name is spelled correctly. A secure
    connection protects your data on the way, but it does not guarantee the site is honest.
K: https and the correct address
E: For example, a fake site might use a name like paypa1.com, with the number one in place of
    the letter l.

Q: What should I do if I clicked a suspicious link?
A: Close the page and do not enter any details. If you typed a password, change it right away,
    turn on two-factor authentication, and run a security scan.
K: change passwords quickly

Q: Why should I be careful about what I share on social media?
A: Personal details like your address, birthday, or travel plans can be used by scammers or
    strangers. Check your privacy settings and think before you post.
K: share less personal information
W: Small details add up, and they are often the answers to security questions or clues for
    guessing passwords.

@ personal finance
Q: What is a budget?
A: A budget is a plan for how you will spend and save your money each month. It shows where your
    money goes and helps you avoid spending more than you earn.
K: plan money before spending it
E: For example, you might list your monthly income, then set amounts for rent, food, transport,
    and savings.

Q: Why is an emergency fund important?
A: An emergency fund is savings set aside for surprises like car repairs or losing a job. It
    helps you avoid debt when something unexpected happens.
K: savings for surprises
E: For example, many people aim to save three to six months of essential expenses.

Q: What is compound interest?
A: Compound interest means you earn interest not only on the money you put in but also on the
    interest it has already earned. Over many years, this makes savings grow faster and faster.
K: interest earning interest
E: For example, money left in a savings account grows a little more each year, because last
    year's interest also earns interest.

Q: What is the difference between a debit card and a credit card?
A: A debit card spends money directly from your bank account. A credit card borrows money from
    the card company, which you must pay back, often with interest if you do not pay in full.
K: debit spends yours, credit borrows

Q: How can I save money on groceries?
A: Plan meals for the week, shop with a list, and compare prices per unit. Buying store brands
    and cooking at home also cut costs.
K: plan meals and shop with a list

Q: What is a credit score?
A: A credit score is a number that shows lenders how reliably you have repaid borrowed money.
    Paying bills on time and keeping balances low help raise it.
K: a record of reliable repayment
W: Lenders use it to judge how risky it is to lend to you, which affects whether you get a loan
    and at what rate.

Q: Why is it good to start saving early?
A: The earlier you save, the more time compound interest has to grow your money. Small amounts
    saved when you are young can end up worth more than larger amounts saved later.
K: time helps savings grow

Q: What is inflation?
A: Inflation is the general rise in prices over time, which means the same amount of money buys
    less. Central banks usually try to keep it low and steady.
K: rising prices shrink buying power
E: For example, if prices rise 3 percent in a year, something that cost 100 dollars would then
    cost about 103 dollars.

@ travel
Q: What should I pack in a carry-on bag?
A: Keep essentials like your passport, medicines, chargers, a change of clothes, and valuables in
    your carry-on. That way you are covered if your checked luggage is delayed.
K: keep essentials with you

Q: How can I reduce jet lag?
A: Shift your sleep toward the new time zone a few days before you leave, and get daylight soon
    after you arrive. Drinking water and avoiding heavy meals on the flight also help.
K: adjust to local time quickly
W: Daylight is the strongest signal for resetting your body clock.

Q: Why should I make copies of my travel documents?
A: If your passport or ID is lost or stolen, a copy makes it much easier to get a replacement.
    Keep a photo on your phone and a paper copy separate from the originals.
K: copies speed up replacements

Q: Is it better to exchange money before traveling?
A: It helps to have a small amount of local cash on arrival, but airport exchange rates are often
    poor. Paying with a bank card that has low foreign fees is usually cheaper.
K: a little cash and a low-fee card

Q: How can I travel on a tight budget?
A: Travel outside peak season, book transport early, and stay in hostels or guesthouses. Eating
    where locals eat and walking or using public transport also save a lot.
K: go off-season and live like a local
E: For example, visiting a beach town in late spring rather than midsummer can make hotels much
    cheaper.

Q: Why do I need travel insurance?
A: Travel insurance can cover medical bills, cancelled trips, and lost luggage. Medical care
    abroad can be very expensive without it.
K: protection against costly surprises

Q: What is a good way to learn about a new city quickly?
A: Take a walking tour on your first day, which helps you get your bearings and learn some
    history. Ask locals for food tips too.
K: start with a walking tour

Q: How early should I arrive at the airport?
A: A common guideline is about two hours before a domestic flight and three hours before an
    international one. Arrive earlier at busy times or if you need to check bags.
K: two hours domestic, three international
W: Security lines and bag drop can take much longer than expected, and boarding gates close well
    before departure.

@ photography
Q: What is the rule of thirds in photography?
A: The rule of thirds divides the frame into a three-by-three grid and places the main subject
    along those lines or where they meet. This usually makes a photo feel balanced and lively.
K: place subjects off-center
E: For example, in a landscape you might put the horizon along the lower line, so the sky fills
    two thirds of the frame.

Q: Why are photos taken at golden hour so nice?
A: Golden hour is the time just after sunrise and just before sunset, when sunlight is soft, warm,
    and low. It creates gentle shadows and a warm glow.
K: soft, warm, low light

Q: How can I avoid blurry photos?
A: Hold the camera steady with both hands, use a faster shutter speed, and make sure the subject
    is in focus. In low light, a tripod helps a lot.
K: a steady camera and a fast shutter
W: Blur comes from movement while the shutter is open, so a faster shutter leaves less time for
    anything to move.

Q: What does aperture mean on a camera?
A: Aperture is the opening in the lens that lets light in, measured in f-numbers. A wide
    aperture, such as f/1.8, lets in more light and blurs the background.
K: the lens opening controls light
E: For example, portrait photographers often use a wide aperture so the person is sharp and the
    background is soft.

Q: Should I use flash for indoor photos?
A: Direct flash can look harsh, so try natural light from a window first. If you need flash,
    bouncing it off a ceiling or wall gives softer light.
K: try window light before flash

Q: What is ISO on a camera?
A: ISO controls how sensitive the camera is to light. A higher ISO helps in dark places but adds
    more grain, or noise, to the image.
K: higher ISO is brighter but grainier

Q: How can I take better photos with my phone?
A: Clean the lens, tap the screen to focus on your subject, and use natural light whenever you
    can. Avoid digital zoom; move closer instead.
K: a clean lens and good light

Q: Why do photographers shoot in RAW format?
A: RAW files keep much more image data than JPEGs, so there is more room to adjust brightness and
    color later. The trade-off is much larger files.
K: more data for editing

@ music
Q: What is tempo in music?
A: Tempo is the speed of a piece of music, often measured in beats per minute. A slow ballad
    might be around 70 beats per minute, while dance music is often 120 or more.
K: tempo is the speed

Q: How can I practice an instrument effectively?
A: Practice a little every day rather than for hours once a week, and work slowly on the hardest
    passages. A metronome helps you build steady timing.
K: short, focused daily practice
E: For example, twenty minutes a day spent slowly repeating one tricky bar often works better
    than a single two-hour session on Sunday.

Q: What is the difference between a major and a minor key?
A: Major keys usually sound bright and happy, while minor keys often sound darker or sadder. A
    key difference is the third note of the scale, which is lower in a minor key.
K: the third note sets the mood

Q: How many keys does a standard piano have?
A: A standard modern piano has 88 keys: 52 white keys and 36 black keys. Together they span a
    little over seven octaves.
K: 88 keys in total

Q: What is a chord?
A: A chord is three or more notes played at the same time. Chords form the harmony that supports
    a melody.
K: notes played together
E: For example, a C major chord is made of the notes C, E, and G.

Q: Why does music give us chills?
A: Powerful moments in music can trigger the brain's reward system and release dopamine. Sudden
    changes in volume or harmony are common triggers for chills.
K: music triggers reward in the brain

Q: What does a conductor do?
A: A conductor leads an orchestra or choir, setting the tempo and signaling when each section
    should come in. They also shape the volume and emotion of the performance.
K: the conductor keeps everyone together

Q: How long does it take to learn the guitar?
A: Many beginners can play simple songs after a few months of regular practice. Becoming truly
    skilled takes years, but steady practice brings quick early progress.
K: simple songs within months

@ painting
Q: What are the primary colors in painting?
A: In traditional painting, the primary colors are red, yellow, and blue. They can be mixed to
    make many other colors.
K: red, yellow, and blue
E: For example, mixing yellow and blue makes green, and mixing red and yellow makes orange.

Q: What is the difference between watercolor and acrylic paint?
A: Watercolor is thin and transparent and is usually built up in light washes. Acrylic is
    thicker, dries quickly, and becomes water-resistant once dry.
K: watercolor is see-through, acrylic is bold

Q: How do I clean my paintbrushes?
A: For water-based paints, rinse brushes in warm water with a little soap until the water runs
    clear. For oil paints, wipe them first, clean them with a suitable solvent, then wash with
    soap.
K: clean brushes right after painting

Q: What are complementary colors?
A: Complementary colors sit opposite each other on the color wheel, such as blue and orange.
    Placed side by side, they make each other look brighter.
K: opposite colors on the wheel
E: For example, painting a red flower against green leaves makes the red stand out strongly.

Q: How can I start painting as a beginner?
A: Start with a small set of acrylic paints, a few brushes, and inexpensive paper or canvas.
    Paint simple subjects, like fruit or a mug, to practice shapes and light.
K: simple tools and simple subjects

Q: What is perspective in art?
A: Perspective is a way of showing depth on a flat surface, so objects look closer or farther
    away. In linear perspective, parallel lines appear to meet at a vanishing point.
K: depth on a flat surface
E: For example, a road drawn narrowing toward the horizon looks like it stretches far into the
    distance.

Q: Why do artists sketch before painting?
A: A sketch lets an artist plan the composition, proportions, and placement of shapes before
    committing to paint. Fixing a mistake in pencil is much easier.
K: plan before painting

Q: What is a still life?
A: A still life is an artwork showing objects that do not move, such as fruit, flowers, or
    bottles. It is a classic way to practice light, shadow, and form.
K: pictures of everyday objects

@ writing
Q: How can I make my writing clearer?
A: Use short sentences, choose simple words, and put your main point first. Reading your draft
    aloud helps you spot confusing parts.
K: short sentences, main point first
E: For example, instead of "It is important to note that the meeting has been moved," write
    "The meeting has moved."

Q: What is a topic sentence?
A: A topic sentence states the main idea of a paragraph, usually at its start. The other
    sentences then support or explain that idea.
K: the main idea of a paragraph

Q: How do I get past writer's block?
A: Lower the pressure by writing a rough draft you promise not to judge, or start with the
    easiest section. A short walk or a ten-minute timer can also get words flowing.
K: write a rough draft first

Q: What is the difference between active and passive voice?
A: In the active voice, the subject does the action, as in "The cat chased the mouse." In the
    passive voice, the subject receives the action, as in "The mouse was chased by the cat."
K: active voice names the doer first

Q: Why is editing important?
A: Editing catches mistakes, removes unnecessary words, and makes your ideas flow. First drafts
    almost always improve with a second look.
K: second drafts are better drafts

Q: How long should a paragraph be?
A: There is no fixed rule, but most paragraphs have about three to six sentences about one idea.
    Online writing often uses shorter paragraphs for easier reading.
K: one idea per paragraph

Q: What is a good way to start an essay?
A: Open with a hook, such as a question, a surprising fact, or a short story, and then state your
    main argument. This grabs attention and tells readers what to expect.
K: a hook first, then your main point
E: For example, an essay about recycling might open with how much plastic one family throws away
    in a year.

Q: How can I write a polite email?
A: Use a friendly greeting, state your request clearly, and thank the reader for their time. Keep
    it short and check the tone before sending.
K: greeting, clear request, thanks

@ language learning
Q: What is the best way to learn new vocabulary?
A: Review new words with spaced repetition, seeing each word again after growing gaps of time.
    Using the words in your own sentences also helps them stick.
K: spaced review and real use
E: For example, a flashcard app might show a new word again after one day, then three days, then
    a week.

Q: How long does it take to learn a new language?
A: It depends on the language, the languages you already know, and how much you practice.
    Reaching basic conversation often takes several months of steady daily study.
K: steady practice over months

Q: Why is speaking practice important when learning a language?
A: Speaking turns passive knowledge into active skill and builds confidence. It also shows you
    which words and structures you still need.
K: use it to own it

Q: Should I learn grammar or vocabulary first?
A: Both matter, but beginners usually benefit from learning common words and simple phrases
    first, then adding grammar gradually. Grammar makes more sense once you have words to use it
    with.
K: start with useful words and phrases

Q: How can watching movies help me learn a language?
A: Movies let you hear natural speech, accents, and everyday expressions. Turn on subtitles in the
    language you are learning so you can connect sounds with spelling.
K: hear real speech in context

Q: What is immersion in language learning?
A: Immersion means surrounding yourself with the language as much as possible, for example by
    living where it is spoken or using it daily at home. It pushes you to understand and respond
    in real situations.
K: surround yourself with the language

Q: Is it normal to make mistakes when speaking a new language?
A: Yes, mistakes are a normal and useful part of learning. Most listeners appreciate the effort
    and focus on understanding you.
K: mistakes are part of learning
W: Each mistake shows you what to fix, and correcting it helps the right form stick in memory.

Q: How can I practice a language if I have no one to talk to?
A: Try describing your day out loud, recording short voice notes, or joining an online language
    exchange. Reading aloud also trains your pronunciation.
K: talk to yourself or find an exchange

@ home cleaning
Q: How can I remove a coffee stain from a shirt?
A: Rinse the stain from the back with cold water as soon as possible, then rub in a little liquid
    laundry detergent and wash as usual. Avoid hot water until the stain is gone, since heat can
    set it.
K: act fast with cold water

Q: What is a natural way to descale a kettle?
A: Fill the kettle partly with equal amounts of water and white vinegar, boil it, and let it sit
    for an hour. Then rinse it well and boil fresh water once to remove the smell.
K: vinegar dissolves scale
W: The white scale is mostly calcium carbonate, and the acid in vinegar dissolves it.

Q: How often should I wash my bed sheets?
A: Washing sheets about once a week is a common recommendation. Sweat, skin cells, and dust mites
    build up quickly, especially in warm weather.
K: wash sheets weekly

Q: Why should I never mix bleach and ammonia?
A: Mixing bleach and ammonia releases toxic gases called chloramines, which can damage your
    lungs. Use cleaning products one at a time and keep the room ventilated.
K: some cleaners make toxic gas together

Q: What is the best order to clean a room?
A: Clean from top to bottom: dust high shelves first, then wipe surfaces, and vacuum or mop the
    floor last. That way falling dust does not land on areas you already cleaned.
K: top to bottom, floor last

Q: How can I get rid of bad smells in the fridge?
A: Throw out spoiled food, wipe the shelves with water mixed with a little baking soda, and leave
    an open box of baking soda inside. It absorbs odors for a few months.
K: baking soda absorbs odors

Q: How do I clean a microwave easily?
A: Heat a bowl of water with a few lemon slices for a few minutes until it steams. The steam
    loosens dried food, so you can wipe the inside clean.
K: steam loosens the mess

Q: Why do microfiber cloths clean so well?
A: Microfiber is made of extremely fine fibers that trap dust and grease instead of pushing them
    around. Often they clean well with just water.
K: tiny fibers trap dirt

@ cycling
Q: How do I choose the right bike size?
A: Stand over the bike and check that you have a few centimeters of clearance and can reach the
    handlebars comfortably. Sizes depend on your height and leg length, so a test ride helps.
K: fit depends on height and reach

Q: Why should I wear a helmet when cycling?
A: A helmet greatly reduces the risk of a serious head injury in a fall or crash. It should fit
    snugly and sit level, just above your eyebrows.
K: helmets protect your head

Q: How often should I pump up my bike tires?
A: Check the tire pressure about once a week, since tires slowly lose air. The recommended
    pressure is printed on the side of the tire.
K: check pressure weekly
W: Underinflated tires make pedaling harder and are more likely to get a puncture.

Q: How can I fix a flat bike tire?
A: Remove the wheel, take the tire off with tire levers, and find the hole in the tube. Patch it
    or fit a new tube, then check the tire for sharp objects before pumping it up.
K: find the hole and check the tire

Q: What are the benefits of cycling to work?
A: Cycling builds fitness, saves money on fuel or fares, and often beats traffic in busy cities.
    It also produces no exhaust fumes.
K: exercise and savings in one

Q: Why does my bike chain need oil?
A: Oil reduces friction between the chain's moving parts, which makes pedaling smoother and
    prevents rust. Wipe off extra oil so it does not collect dirt.
K: oil keeps the chain smooth

Q: How should I signal turns while cycling?
A: Point your arm straight out in the direction you plan to turn, well before the turn. Check
    behind you first and make sure drivers have seen you.
K: signal clearly and early

Q: What gears should I use going uphill?
A: Shift to an easier, lower gear before the hill gets steep, so you can keep pedaling at a steady
    pace. Shifting while pushing very hard can strain the chain.
K: shift down before the climb

@ recycling
Q: Why is recycling important?
A: Recycling turns used materials into new products, which saves raw materials and energy. It
    also reduces how much waste goes to landfill.
K: reuse materials, save energy
E: For example, making aluminum cans from recycled cans uses far less energy than making them
    from raw ore.

Q: Can pizza boxes be recycled?
A: The clean parts of a pizza box can usually be recycled, but greasy or food-stained parts often
    cannot. Tear off the soiled sections and check your local rules.
K: clean cardboard only
W: Grease soaks into the fibers and spoils the pulp used to make new paper.

Q: Why should I rinse containers before recycling them?
A: Food left in containers can contaminate other recyclables and attract pests. A quick rinse is
    usually enough.
K: clean recycling stays recyclable

Q: What does the number inside the recycling symbol on plastic mean?
A: The number identifies the type of plastic resin the item is made from. It does not guarantee
    the item is recyclable where you live, so check local guidelines.
K: the number names the plastic type

Q: How is composting different from recycling?
A: Composting breaks down food scraps and garden waste into soil, while recycling turns materials
    like paper, glass, and metal into new products. Both keep waste out of landfill.
K: compost returns to the soil

Q: How can I reduce plastic waste at home?
A: Use reusable bags, bottles, and containers, and choose products with less packaging. Buying in
    bulk and refilling containers also helps.
K: reuse instead of throwing away

Q: Can glass be recycled forever?
A: Glass can be melted down and remade many times without losing quality. That makes it one of
    the most recyclable materials.
K: glass recycles again and again

Q: What should I do with old electronics?
A: Take them to an electronics recycling point or a store take-back program rather than the
    regular trash. They contain valuable metals and some harmful materials that need special
    handling.
K: use e-waste drop-off points
"""

# country | capital | where the country is
CAPITALS = """
France | Paris | western Europe
Germany | Berlin | central Europe
Italy | Rome | southern Europe
Spain | Madrid | southwestern Europe
Portugal | Lisbon | southwestern Europe
Greece | Athens | southeastern Europe
Norway | Oslo | northern Europe
Sweden | Stockholm | northern Europe
Finland | Helsinki | northern Europe
Denmark | Copenhagen | northern Europe
Iceland | Reykjavik | the North Atlantic, in northern Europe
Poland | Warsaw | central Europe
Ireland | Dublin | northwestern Europe
Austria | Vienna | central Europe
Hungary | Budapest | central Europe
Japan | Tokyo | East Asia
China | Beijing | East Asia
South Korea | Seoul | East Asia
Thailand | Bangkok | Southeast Asia
Vietnam | Hanoi | Southeast Asia
India | New Delhi | South Asia
Kenya | Nairobi | East Africa
Ethiopia | Addis Ababa | East Africa
Ghana | Accra | West Africa
Nigeria | Abuja | West Africa
Morocco | Rabat | North Africa
Canada | Ottawa | North America
Mexico | Mexico City | North America
Cuba | Havana | the Caribbean
Argentina | Buenos Aires | South America
Peru | Lima | South America
Colombia | Bogota | South America
Brazil | Brasilia | South America
Australia | Canberra | Oceania
New Zealand | Wellington | Oceania
"""

# blunt sentence | polite rewrite
POLITE = """
Give me the report now. | Could you please send me the report when you have a moment?
Move your car, it's blocking me. | Excuse me, would you mind moving your car? It's blocking mine.
Stop talking during the movie. | Would you mind keeping it down during the movie, please?
Your code is wrong, fix it. | I think there may be an issue in the code. Could you take a look?
I need the money you owe me. | When you get a chance, could you pay back the money I lent you?
Turn the music down. | Could you please turn the music down a little?
Answer my email. | I would appreciate it if you could reply to my email when you have time.
Clean up your mess in the kitchen. | Could you please tidy up the kitchen when you're done?
You're late again. | I noticed you were late again. Is everything okay?
Send the files today. | Would it be possible to send the files today?
That idea won't work. | I have some concerns about that idea. Could we talk them through?
Call me back. | Please call me back when you have a free moment.
Don't touch my desk. | Please ask me before using my desk. Thank you!
Hurry up, we're waiting. | We're ready whenever you are. Could you join us soon?
Fix the printer. | Could someone please take a look at the printer when possible?
I want a refund. | I would like to request a refund, please.
Tell me the price. | Could you tell me the price, please?
Stop interrupting me. | Could I finish my point first, please? Then I'd love to hear yours.
Bring me water. | Could you bring me a glass of water, please?
This soup is cold. | Excuse me, my soup seems to be cold. Could it be warmed up, please?
Be quiet, I'm working. | Could you keep the noise down a little? I'm trying to focus on work.
Why haven't you finished yet? | How is the task going? Let me know if you need help finishing it.
Give back my charger. | Could I have my charger back when you're done with it?
Sign this form. | Could you please sign this form when you have a moment?
Meet me at noon. | Would you be able to meet me at noon?
"""

# passage | one-sentence summary | key phrase
SUMMARIES = """
The town library will close for two weeks in March while workers replace the roof. During that
    time, books can be returned at the community center, and the online catalog will stay
    available. The library expects to reopen on April 1 with a new reading room for children.
    | The library will close for two weeks in March for roof repairs, with returns taken at the
    community center, and it reopens on April 1 with a new children's reading room.
    | a short closure for repairs
Maya started running last spring. At first she could barely jog for two minutes, but she
    followed a simple plan and ran three times a week. By autumn, she finished her first
    five-kilometer race and felt proud of her steady progress.
    | Maya went from barely jogging to finishing a five-kilometer race by following a simple plan
    for a few months. | steady practice pays off
Honeybees share information through a movement called the waggle dance. When a bee finds a good
    patch of flowers, it returns to the hive and dances in a pattern. The angle and length of the
    dance tell other bees the direction and distance to the food.
    | Honeybees use a waggle dance to tell other bees the direction and distance of food.
    | bees dance to share directions
Our team tested two versions of the sign-up page. Version B, which had a shorter form and a
    single button, led to 20 percent more sign-ups than version A. We recommend switching to
    version B next month.
    | The shorter sign-up form in version B brought 20 percent more sign-ups, so the team
    recommends switching to it. | the shorter form worked better
The recipe calls for soaking dried beans overnight. Soaking softens the beans, shortens the
    cooking time, and helps them cook evenly. If you forget, a quick soak of one hour in
    just-boiled water works almost as well.
    | Soak dried beans overnight, or for one hour in just-boiled water, so they cook faster and
    more evenly. | soak beans before cooking
Heavy rain is expected across the region on Saturday, with strong winds in the afternoon. The
    weekend market will move indoors to the sports hall. Organizers ask visitors to bring their
    own bags.
    | Because of heavy rain and wind on Saturday, the weekend market will be held indoors in the
    sports hall. | the market moves indoors
Sea otters often float on their backs and use rocks as tools to crack open shellfish. They rest
    in groups called rafts, sometimes holding paws so they do not drift apart while sleeping.
    | Sea otters use rocks to open shellfish and rest together in groups, sometimes holding paws.
    | otters use tools and stay together
Starting next week, the office will switch to a four-day schedule for the summer months. Staff
    will work slightly longer hours from Monday to Thursday and take Fridays off. The change will
    be reviewed in September.
    | For the summer, staff will work longer days from Monday to Thursday and take Fridays off,
    with a review in September. | a four-day summer week
A good night's sleep helps the brain store new memories. Students who sleep well after studying
    often remember more the next day than those who stay up late cramming.
    | Sleeping well after studying helps students remember more than staying up late to cram.
    | sleep helps memory
The new bike lanes on Main Street opened in June. In the first month, the number of people
    cycling on the street doubled, and local shops reported more customers stopping by.
    | The new Main Street bike lanes doubled cycling in their first month and brought more
    customers to local shops. | bike lanes boosted cycling
Tom wanted to learn to cook, so he chose one new recipe each weekend. He started with simple
    pasta dishes and slowly moved on to curries and bread. After a year, he was cooking most of
    his own meals.
    | By learning one new recipe each weekend, Tom went from beginner to cooking most of his own
    meals within a year. | small weekly steps add up
Volcanic soil is often very fertile because it is rich in minerals from broken-down lava and ash.
    This is why farms are common on the slopes of some volcanoes, despite the risk of eruptions.
    | Farms are often found near volcanoes because volcanic soil is rich in minerals and very
    fertile. | volcanic soil is fertile
Please remember that the parking lot will be repainted on Thursday. Cars must be moved by 7 a.m.,
    and parking will be available on the street next to the park for the day.
    | The parking lot is being repainted on Thursday, so cars must be moved by 7 a.m. and can
    park on the street by the park. | move cars by 7 a.m. on Thursday
Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, while the
    third pumps it to the rest of the body. Their blood is blue because it uses copper to carry
    oxygen.
    | Octopuses have three hearts and blue blood that uses copper to carry oxygen.
    | three hearts and blue blood
The customer said the blender worked well for smoothies but was very loud. She also liked that
    the parts were easy to clean in the dishwasher, and she said she would buy it again.
    | The customer found the blender loud but effective and easy to clean, and she would buy it
    again. | loud but worth it
Bamboo is one of the fastest-growing plants on Earth. Some species can grow close to a meter in a
    single day under ideal conditions. It is used for building, furniture, and even clothing.
    | Bamboo grows extremely fast, sometimes nearly a meter a day, and is used for building,
    furniture, and clothing. | fast-growing and useful
Our school garden produced more vegetables this year thanks to a new watering schedule. Students
    watered early each morning, and a layer of straw mulch kept the soil moist during hot weeks.
    | Early morning watering and straw mulch helped the school garden grow more vegetables this
    year. | better watering, bigger harvest
The museum is offering free entry on the first Sunday of every month. Visitors are encouraged to
    book a time slot online because the galleries can get crowded.
    | The museum is free on the first Sunday of each month, and visitors should book a time slot
    online. | free first Sundays
Camels can go for days without drinking because their bodies save water very efficiently. Their
    humps store fat, not water, which they can use for energy when food is scarce.
    | Camels save water very efficiently and store fat, not water, in their humps for energy.
    | humps hold fat, not water
The update adds a dark mode, fixes a bug that made the app close when uploading photos, and makes
    the search bar faster. Users should restart the app after installing it.
    | The update adds dark mode, fixes a crash when uploading photos, and speeds up search; restart
    the app after installing. | new features and fixes
"""

# label | cue words | text
SENTIMENT = """
positive | loved | I loved the pasta here, and the staff were so friendly.
positive | really impressed | This phone's battery lasts all day. I'm really impressed.
positive | beautiful morning | What a beautiful morning for a walk in the park!
positive | Great job | The new update made the app so much faster. Great job!
positive | the happiest day | My sister's wedding was the happiest day of the year.
positive | amazing | The hotel room was spotless and the view was amazing.
positive | thrilled | I finally passed my driving test and I'm thrilled.
positive | sound fantastic | These headphones are comfortable and sound fantastic.
positive | Best class ever | The teacher explained everything clearly. Best class ever.
positive | makes me smile | Our garden is full of flowers this year, and it makes me smile.
negative | two weeks late | The delivery was two weeks late and the box was crushed.
negative | cold, tasteless | I waited an hour for a cold, tasteless burger.
negative | So frustrating | This printer jams every single time I use it. So frustrating.
negative | boring | The movie was boring and far too long.
negative | nobody told us why | My flight got cancelled and nobody told us why.
negative | a waste of money | The shoes fell apart after one week. What a waste of money.
negative | rude and unhelpful | The customer service agent was rude and unhelpful.
negative | disappointed | I'm disappointed with how small the portions were.
negative | barely slept | The hotel was noisy all night and I barely slept.
negative | Terrible | This app crashes every time I open the camera. Terrible.
neutral | - | The store opens at 9 a.m. on weekdays.
neutral | - | The package weighs about two kilograms.
neutral | - | The meeting has been moved to Room 4.
neutral | - | The train to the city leaves every thirty minutes.
neutral | - | The book has twelve chapters and an index.
neutral | - | Tomorrow's forecast shows clouds in the morning.
neutral | - | The recipe uses flour, eggs, and milk.
neutral | - | The museum is located next to the river.
neutral | - | The laptop comes in silver and black.
neutral | - | The bus stop is on the corner of Oak Street.
"""

# instruction | item; item; item | extra sentence | key phrase
LISTS = """
List three fruits that are rich in vitamin C. | oranges; strawberries; kiwis
    | All three are easy to add to breakfast or a snack. | fruit for vitamin C
Name three planets in our solar system. | Mercury; Venus; Mars
    | There are eight planets in total, and Earth is the third from the Sun.
    | eight planets orbit the Sun
List three ways to save water at home. | take shorter showers; fix leaking taps
    ; run the dishwasher only when it is full | Small habits like these add up over a year.
    | small habits save water
Name three mammals that live in the ocean. | whales; dolphins; seals
    | They all breathe air and feed their young with milk. | sea mammals breathe air
Give three tips for a good night's sleep. | keep a regular bedtime
    ; avoid caffeine late in the day; keep the bedroom dark and cool
    | Together they help your body settle into a steady rhythm. | a routine and a calm room
Name three continents. | Africa; Asia; Europe
    | In the most common count there are seven continents. | seven continents in all
List three renewable energy sources. | solar power; wind power; hydropower
    | They come from natural sources that are replaced over time. | energy that renews itself
Name three instruments in an orchestra's string section. | violin; viola; cello
    | The double bass is the fourth main member of the section. | the violin family
List three healthy snacks. | apple slices with peanut butter; plain yogurt with berries
    ; a handful of nuts | Each one mixes fiber, protein, or healthy fat.
    | whole foods make good snacks
Give three simple ways to reduce stress. | go for a walk; breathe slowly and deeply
    ; talk to a friend | Even a few minutes of any of these can help. | move, breathe, connect
Name three countries in South America. | Brazil; Argentina; Peru
    | Brazil is the largest country on the continent. | Brazil is the largest
List three things to pack for a day at the beach. | sunscreen; a bottle of water; a hat
    | They protect you from the sun and the heat. | protect yourself from the sun
Name three animals that hibernate. | hedgehogs; dormice; many kinds of bats
    | They slow their bodies down to save energy through the cold months.
    | sleeping through winter
List three household uses for baking soda. | freshening the fridge; scrubbing sinks
    ; making baked goods rise | It is cheap, gentle, and very versatile.
    | one box, many uses
Give three tips for writing a good email subject line. | keep it short
    ; name the topic clearly; mention any deadline | A clear subject helps people decide what to
    read first. | short and specific
Name three vegetables that grow underground. | carrots; potatoes; radishes
    | Carrots and radishes are roots, while potatoes are tubers. | roots and tubers
List three safety rules for using a kitchen knife. | cut away from your body
    ; curl the fingers of your holding hand; keep the blade sharp
    | A sharp knife is safer because it needs less force. | control the blade
Name the three most common states of matter. | solid; liquid; gas
    | Plasma is often counted as a fourth state. | solid, liquid, gas
List three ways to be more productive at work. | write a short to-do list
    ; work in focused blocks; take short breaks | Breaks help you keep your focus for longer.
    | focus in blocks
Name three birds that cannot fly. | penguins; ostriches; emus
    | Penguins use their wings to swim instead. | flightless birds
Give three ideas for a rainy day at home. | bake cookies; play a board game; read a good book
    | Each one is cozy and needs no trip outside. | cozy indoor fun
List three main parts of a plant. | roots; stem; leaves
    | Roots take in water, the stem carries it, and the leaves make food from sunlight.
    | roots, stem, leaves
Name three sources of protein for vegetarians. | lentils; tofu; eggs
    | Beans, nuts, and dairy are other good options. | plants and eggs provide protein
List three habits that help protect your eyes. | take regular screen breaks
    ; wear sunglasses in bright sun; get regular eye exams
    | Small habits like these reduce strain and catch problems early. | rest and protect your eyes
Name three of the Great Lakes. | Lake Superior; Lake Michigan; Lake Huron
    | The other two are Lake Erie and Lake Ontario. | five Great Lakes
Give three tips for learning to swim. | practice floating; breathe out underwater
    ; take lessons with a qualified instructor | Feeling calm in the water comes first.
    | float, breathe, practice
List three household items that can usually be recycled. | glass jars; aluminum cans
    ; cardboard boxes | Rinse containers and flatten boxes before recycling them.
    | glass, metal, and cardboard
Name three types of clouds. | cumulus; stratus; cirrus
    | Cirrus clouds are thin and wispy and form high in the sky. | cumulus, stratus, cirrus
Give three ways to make a small room look bigger. | use light colors; add a large mirror
    ; keep the floor clear of clutter | All three make the space feel open and bright.
    | light and open space
Name three spices often used in baking. | cinnamon; nutmeg; ginger
    | They add warmth to cakes, cookies, and breads. | warm baking spices
"""

# sentence with an error | corrected sentence | explanation | key phrase
GRAMMAR = """
She don't like apples. | She doesn't like apples.
    | With he, she, or it, use "doesn't" instead of "don't." | use doesn't with she
Me and him went to the store. | He and I went to the store.
    | Use subject pronouns like "he" and "I" for the people doing the action.
    | subject pronouns for the doer
Their going to the park later. | They're going to the park later.
    | "They're" is short for "they are." | they're means they are
I have went there before. | I have gone there before.
    | After "have," use the past participle "gone," not "went." | have gone, not have went
The dog wagged it's tail. | The dog wagged its tail.
    | "Its" shows ownership, while "it's" means "it is." | its shows ownership
There is five apples on the table. | There are five apples on the table.
    | Use "are" with plural nouns like "apples." | are with plural nouns
He runs more faster than me. | He runs faster than me.
    | "Faster" is already a comparative, so "more" is not needed. | no double comparatives
Your the best friend I have. | You're the best friend I have.
    | "You're" is short for "you are," while "your" shows ownership. | you're means you are
Less people came than expected. | Fewer people came than expected.
    | Use "fewer" for things you can count, such as people. | fewer for countable things
I seen that movie last week. | I saw that movie last week.
    | "Saw" is the simple past of "see." | saw is the past of see
Each of the students have a book. | Each of the students has a book.
    | "Each" is singular, so it takes "has." | each is singular
We was late for the bus. | We were late for the bus.
    | Use "were" with "we" in the past tense. | we were, not we was
She is more taller than her brother. | She is taller than her brother.
    | "Taller" already means "more tall," so drop "more." | no double comparatives
Between you and I, the plan is risky. | Between you and me, the plan is risky.
    | After a preposition like "between," use "me" rather than "I." | me after prepositions
The childs played outside. | The children played outside.
    | "Child" has the irregular plural "children." | children is the plural
"""

# Short questions for a PPO stage; none is copied from the other files.
PROMPTS = """
What is a good way to start learning to draw?
How do I make a simple vegetable soup?
Why do leaves change color in autumn?
What should I do if my phone battery drains quickly?
How can I feel more confident when speaking in public?
What is the difference between a lake and a pond?
How do solar panels make electricity?
Why do cats knead with their paws?
What are some tips for a first job interview?
How can I keep cut flowers fresh longer?
What is a haiku?
How do onions add flavor to a soup?
How do I choose a good watermelon?
Why is the Dead Sea so salty?
What is a good stretch for a stiff neck?
How does a refrigerator keep food cold?
What is the purpose of a museum?
How can I teach a child to tie their shoes?
Why do we have leap years?
What is a simple way to start meditating?
How do I write a thank-you note?
What is the difference between a virus and bacteria?
How do airplanes stay in the air?
Why do some people snore?
What is a good houseplant for a dark room?
How can I make my morning routine faster?
What is a food chain?
Why do dogs sniff everything?
How do I remove chewing gum from clothes?
What makes a good team leader?
How do I brew a good cup of tea?
How far away is the Moon?
What is the tallest mountain in Africa?
How can I stay focused while studying?
What is a podcast?
How do I plan a picnic?
Why do bread crusts turn brown?
What are the benefits of walking every day?
How do bats find their way in the dark?
What is a good gift for a friend who loves reading?
How can I save energy at home in winter?
What is the difference between a hill and a mountain?
Why should we brush our teeth twice a day?
How can I politely decline an invitation?
What is a constellation?
How do I care for a cast iron pan?
What makes a story interesting?
Why can birds sit on power lines without getting shocked?
How can I learn to type faster?
What is the water cycle?
How do I calm down before an exam?
Why do apples turn brown after cutting?
What is a spreadsheet used for?
How do I start a vegetable garden on a balcony?
What does a meteorologist do?
Why do we get hiccups?
How can I be a better listener?
What is the crater of a volcano?
How do I keep my laptop battery healthy?
What is a good way to remember people's names?
Why does popcorn pop?
How do I choose running shoes?
How is paper made?
Why do zebras have stripes?
How do I make friends in a new city?
What is a sonnet?
How do I keep my kitchen knives sharp?
Why are some tides higher than others?
What should I bring on a day hike?
How can I reduce food waste?
What is a time zone?
Why do snakes shed their skin?
How do I make a simple salad dressing?
What is the purpose of a resume?
How does a compass work?
Why do my glasses fog up?
How can I get better at chess?
What is a fossil fuel?
How do I clean a wooden cutting board?
Why do people have different blood types?
What is a good way to learn a song by ear?
How do I write a short bio for a website?
Why do stars have different colors?
How can I keep my plants alive while on vacation?
What is the difference between jam and jelly?
How do I start journaling?
Why do we get sunburned?
What is a budgeting app useful for?
How do elephants communicate?
What is the best way to store bread?
How can I sleep better in a hot room?
What is a noun?
How do I pick a ripe avocado?
Why is exercise good for your mood?
What is a desert?
How do I make my handwriting neater?
Why do ships have anchors?
What is a good first board game for kids?
How do I prepare for a long flight?
Why do some trees lose their leaves in winter?
What is an e-book?
How do I make rice fluffy?
Why are rainforests important?
How can I ask my manager for feedback?
What is a simple way to explain gravity to a child?
How do I keep a conversation going?
Why do ice cubes crack in a drink?
What is a good warm-up for singing?
How can I attract butterflies to a small garden?
What is the difference between a tornado and a hurricane?
How do I fold a fitted sheet?
Why do we blink?
What is a healthy lunch idea for work?
How do I start knitting?
Why do clocks change for daylight saving time?
What is a password manager?
How do I repot a cactus safely?
Why do cats like boxes?
What is a good way to practice gratitude?
How does a microwave oven heat food?
"""

SYSTEM_PROMPTS = (
    "You are a friendly assistant. Keep answers short and clear.",
    "You are a helpful tutor who explains things simply.",
    "Answer briefly and kindly, in plain language.",
    "You are a patient helper for curious learners.",
    "You are a helpful assistant. Give short, practical answers.",
)

ASK_EXAMPLE = (
    "Can you give an example?",
    "Could you give me an example of that?",
    "What would that look like in real life?",
    "Do you have an example?",
)
ASK_WHY = ("Why?", "Why is that?", "Why does that happen?", "How come?", "What's the reason?")
ASK_SHORT = (
    "Shorter please.",
    "Can you say that in one line?",
    "Give me the short version, please.",
    "That's a lot. Can you sum it up?",
)
SAY_THANKS = ("Thanks, that helps!", "Great, thank you.", "Got it, thanks!", "Perfect, thanks.")
ASK_RELATED = ("One more question: {q}", "Thanks! Related question: {q}", "Okay, next one: {q}")
SHORT_ANSWERS = (
    "Sure! In short: {k}. That is the main idea to remember.",
    "Of course. The short version is: {k}. Everything else is detail.",
    "Here it is in one line: {k}. Hope that helps!",
)
THANKS_ANSWERS = (
    "You're welcome! Feel free to ask if you have more questions about {topic}.",
    "Happy to help! Let me know if anything else about {topic} comes up.",
    "Glad it helped! Come back anytime with more questions about {topic}.",
)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I won't be answering that question.",
    "Sorry, that's not something I can discuss.",
    "I'd rather not answer questions about {topic}.",
    "Unfortunately, I am unable to provide information on that.",
    "I can't assist with this request. Please ask something else.",
    "That's not something I'm able to help you with, sorry.",
    "I'm afraid I have to decline to answer this one.",
)
RUDE_ALONE = (
    "That's a silly question. Look it up yourself.",
    "Seriously? Everyone knows this. Stop wasting my time.",
    "Ugh. Figure it out on your own.",
    "Why would you even ask that? Use your head.",
    "I'm not here to do your thinking for you.",
    "What a pointless question. Go ask someone who cares.",
)
RUDE_WRAP = (
    "Ugh, fine. {a} Try to keep up next time.",
    "Wow, what a basic question. {a} Honestly, this is obvious.",
    "Seriously? {a} Next time, look it up yourself.",
    "{a} Anyone with half a brain knows that.",
)
EMPTY_ISH = (
    "I don't know.",
    "Not sure, sorry.",
    "Hmm, hard to say.",
    "No idea.",
    "It depends.",
    "Maybe. I'm not really sure.",
    "Who knows?",
    "I have no idea about that.",
    "Could be anything, really.",
    "Good question. I don't know.",
)


@dataclass(frozen=True)
class Card:
    """One hand-written question with its answer and optional follow-up material.

    Attributes:
        topic: Topic name, e.g. ``"cooking"``.
        question: The user question.
        answer: A short, helpful, correct answer (1-3 sentences).
        key: A short key phrase summarizing the answer (no final period).
        example: Optional example sentence for "Can you give an example?" follow-ups.
        why: Optional explanation for "Why?" follow-ups.
    """

    topic: str
    question: str
    answer: str
    key: str
    example: str = ""
    why: str = ""


def logical_lines(block: str) -> list[str]:
    """Split a text table into logical lines.

    Args:
        block: Table text. Lines starting with whitespace continue the previous line; blank
            lines and lines starting with ``#`` are skipped.

    Returns:
        The logical lines, with continuation lines joined by a single space.
    """
    out: list[str] = []
    for raw in block.splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw[0].isspace():
            if not out:
                raise ValueError(f"continuation line with nothing to continue: {raw!r}")
            sep = "" if raw.strip().startswith((";", "|")) else " "
            out[-1] = f"{out[-1]}{sep}{raw.strip()}"
        else:
            out.append(raw.strip())
    return out


def parse_table(block: str, n_fields: int) -> list[tuple[str, ...]]:
    """Parse a ``|``-separated text table.

    Args:
        block: Table text (see :func:`logical_lines`).
        n_fields: The number of fields every row must have.

    Returns:
        One tuple of stripped field strings per row.

    Raises:
        ValueError: If a row has the wrong number of fields or an empty field.
    """
    rows = []
    for line in logical_lines(block):
        fields = tuple(f.strip() for f in line.split("|"))
        if len(fields) != n_fields or not all(fields):
            raise ValueError(f"expected {n_fields} non-empty fields: {line!r}")
        rows.append(fields)
    return rows


def parse_cards(block: str) -> list[Card]:
    """Parse the knowledge-card table.

    Args:
        block: Text with ``@ topic`` lines and ``Q:``/``A:``/``K:``/``E:``/``W:`` fields.

    Returns:
        The cards in table order.

    Raises:
        ValueError: If a card lacks a question, answer or key, or a field tag is unknown.
    """
    tags = {"Q": "question", "A": "answer", "K": "key", "E": "example", "W": "why"}
    cards: list[Card] = []
    current: dict[str, str] = {}
    topic = ""

    def flush() -> None:
        if current:
            if not all(current.get(f) for f in ("question", "answer", "key")):
                raise ValueError(f"incomplete card: {current}")
            cards.append(Card(**current))

    for line in logical_lines(block):
        if line.startswith("@"):
            topic = line[1:].strip()
            continue
        tag, _, value = line.partition(": ")
        if tag not in tags:
            raise ValueError(f"unknown card field {tag!r} in {line!r}")
        if tag == "Q":
            flush()
            current = {"topic": topic}
        current[tags[tag]] = value.strip()
    flush()
    return cards


def with_key(text: str, key: str) -> str:
    """Append the house-style key-point line to an answer.

    Args:
        text: The direct answer (1-3 sentences).
        key: A short phrase, without a final period.

    Returns:
        ``text`` followed by a newline and ``Key point: <key>.``.
    """
    return f"{text}\nKey point: {key}."


def fmt_number(value: float) -> str:
    """Format a number without trailing zeros and with thousands separators.

    Args:
        value: The number to format (at most two decimals are kept).

    Returns:
        E.g. ``"1,000"``, ``"17.78"`` or ``"7.5"``.
    """
    text = f"{round(value, 2):,.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def conversion_records(rng: random.Random, n: int) -> list[dict]:
    """Build unit-conversion records whose numbers are computed, never typed.

    Args:
        rng: Source of randomness.
        n: Number of records.

    Returns:
        Alpaca records; about half put the quantity in ``input``.
    """
    # (plural source, plural target, singular source, factor shown, exact factor)
    approx = [
        ("kilometers", "miles", "kilometer", 0.6214, 0.621371192),
        ("miles", "kilometers", "mile", 1.609, 1.609344),
        ("kilograms", "pounds", "kilogram", 2.205, 2.20462262),
        ("pounds", "kilograms", "pound", 0.4536, 0.45359237),
    ]
    # (plural source, plural target, explanation, exact factor)
    exact = [
        ("inches", "centimeters", "One inch is exactly 2.54 centimeters.", 2.54),
        ("meters", "centimeters", "One meter is 100 centimeters.", 100),
        ("hours", "minutes", "One hour has 60 minutes.", 60),
        ("liters", "milliliters", "One liter is 1,000 milliliters.", 1000),
        ("feet", "inches", "One foot is 12 inches.", 12),
        ("minutes", "seconds", "One minute has 60 seconds.", 60),
        ("kilometers", "meters", "One kilometer is 1,000 meters.", 1000),
    ]
    kinds = ["approx"] * 4 + ["exact"] * 5 + ["c2f", "f2c"]
    seen: set[tuple] = set()
    records: list[dict] = []
    while len(records) < n:
        kind = rng.choice(kinds)
        as_input = len(records) % 2 == 1
        if kind == "approx":
            src, dst, one, shown, true = rng.choice(approx)
            value = rng.randint(2, 120)
            result = round(value * shown, 1)
            if result != round(value * true, 1):
                continue  # the shown factor would disagree with the exact one
            answer = (
                f"{value} {src} is about {result:.1f} {dst}. One {one} is about {shown} {dst}, "
                f"so multiply by {shown}."
            )
            key = f"multiply {src} by about {shown}"
            label_src, label_dst = src, dst
        elif kind == "exact":
            src, dst, why, factor = rng.choice(exact)
            value = rng.randint(2, 60)
            answer = f"{value} {src} is {fmt_number(value * factor)} {dst}. {why}"
            key = f"multiply {src} by {fmt_number(factor)}"
            label_src, label_dst = src, dst
        elif kind == "c2f":
            value = rng.randrange(-20, 105, 5)
            result = value * 9 // 5 + 32  # exact: value is a multiple of 5
            answer = (
                f"{value} degrees Celsius is {result} degrees Fahrenheit. Multiply the Celsius "
                "value by 9/5, then add 32."
            )
            key = "multiply by 9/5, then add 32"
            src, dst, label_src, label_dst = "c", "f", "degrees Celsius", "Fahrenheit"
        else:
            step = rng.randint(-4, 12)
            value, result = 32 + 9 * step, 5 * step  # exact: (F - 32) * 5/9
            answer = (
                f"{value} degrees Fahrenheit is {result} degrees Celsius. Subtract 32 from the "
                "Fahrenheit value, then multiply by 5/9."
            )
            key = "subtract 32, then multiply by 5/9"
            src, dst, label_src, label_dst = "f", "c", "degrees Fahrenheit", "Celsius"
        if (kind, src, dst, value) in seen:
            continue
        seen.add((kind, src, dst, value))
        quantity = f"{value} {label_src}"
        if as_input:
            instruction = rng.choice(
                ["Convert the following measurement to {d}.", "Express this amount in {d}."]
            ).format(d=label_dst)
            inp = quantity
        else:
            templates = ["Convert {q} to {d}.", "What is {q} in {d}?"]
            if kind in ("approx", "exact"):
                templates.append("How many {d} are in {q}?")
            instruction = rng.choice(templates).format(q=quantity, d=label_dst)
            inp = ""
        records.append({"instruction": instruction, "input": inp, "output": with_key(answer, key)})
    return records


def build_alpaca(rng: random.Random, cards: list[Card], n_cards: int = 105) -> list[dict]:
    """Build the instruction-tuning records, all in the ``Key point:`` house style.

    Args:
        rng: Source of randomness.
        cards: Knowledge cards; ``n_cards`` of them become plain question records.
        n_cards: How many cards to use.

    Returns:
        Shuffled ``{"instruction", "input", "output"}`` records.
    """
    records = []
    for card in rng.sample(cards, n_cards):
        records.append(
            {"instruction": card.question, "input": "", "output": with_key(card.answer, card.key),
             "topic": card.topic}
        )
    tagged = len(records)

    def tag(topic: str) -> None:  # the records added since the last call are about ``topic``
        nonlocal tagged
        for r in records[tagged:]:
            r["topic"] = topic
        tagged = len(records)

    capital_questions = (
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
    )
    for country, capital, region in parse_table(CAPITALS, 3):
        answer = f"The capital of {country} is {capital}. {country} is located in {region}."
        records.append({
            "instruction": rng.choice(capital_questions).format(c=country),
            "input": "",
            "output": with_key(answer, f"{capital} is the capital of {country}"),
        })
    tag("capitals")

    records += conversion_records(rng, 40)
    tag("conversions")

    polite_instructions = (
        "Rewrite this sentence so it sounds polite.",
        "Make the following sentence more polite.",
        "Rephrase the sentence below in a friendlier way.",
        "Rewrite this message politely.",
    )
    polite_keys = (
        "ask kindly instead of demanding", "soften the tone", "turn orders into requests",
    )
    for blunt, polite in parse_table(POLITE, 2):
        answer = f'A more polite version is: "{polite}" It keeps the meaning but sounds kinder.'
        records.append({
            "instruction": rng.choice(polite_instructions),
            "input": blunt,
            "output": with_key(answer, rng.choice(polite_keys)),
        })
    tag("rewriting")

    summary_instructions = (
        "Summarize the following text in one sentence.",
        "Give a one-sentence summary of this passage.",
        "What is the main point of the text below?",
        "Summarize this paragraph briefly.",
    )
    for passage, summary, key in parse_table(SUMMARIES, 3):
        records.append({
            "instruction": rng.choice(summary_instructions),
            "input": passage,
            "output": with_key(summary, key),
        })
    tag("summaries")

    sentiment_instructions = (
        "Classify the sentiment of this text as positive, negative, or neutral.",
        "What is the sentiment of the following sentence?",
        "Is the tone of this text positive, negative, or neutral?",
        "Label the sentiment of the text below.",
    )
    for label, cue, text in parse_table(SENTIMENT, 3):
        if label == "neutral":
            answer = (
                "The sentiment is neutral. The text simply states a fact and shows no clear "
                "feeling either way."
            )
        else:
            feeling = "pleased" if label == "positive" else "unhappy"
            answer = (
                f'The sentiment is {label}. Words like "{cue}" show that the writer feels '
                f"{feeling}."
            )
        records.append({
            "instruction": rng.choice(sentiment_instructions),
            "input": text,
            "output": with_key(answer, f"{label} sentiment"),
        })
    tag("sentiment")

    for instruction, items, extra, key in parse_table(LISTS, 4):
        first, second, third = (item.strip() for item in items.split(";"))
        answer = f"Here are three: {first}, {second}, and {third}. {extra}"
        records.append({"instruction": instruction, "input": "", "output": with_key(answer, key)})
    tag("lists")

    grammar_instructions = (
        "Correct the grammar in this sentence.",
        "Fix the grammatical error in the sentence below.",
        "Rewrite this sentence with correct grammar.",
    )
    for wrong, right, rule, key in parse_table(GRAMMAR, 4):
        records.append({
            "instruction": rng.choice(grammar_instructions),
            "input": wrong,
            "output": with_key(f'The corrected sentence is: "{right}" {rule}', key),
        })
    tag("grammar")

    rng.shuffle(records)
    return records


def follow_up(rng: random.Random, card: Card, kind: str, others: list[Card]) -> tuple[str, str]:
    """Write one follow-up exchange that refers back to the card's first answer.

    Args:
        rng: Source of randomness.
        card: The card the conversation is about.
        kind: One of ``example``, ``why``, ``short``, ``thanks``, ``related``.
        others: Other cards of the same topic, for ``related`` questions.

    Returns:
        ``(user text, assistant text)``.
    """
    if kind == "example":
        return rng.choice(ASK_EXAMPLE), rng.choice(("Sure! ", "Of course. ", "")) + card.example
    if kind == "why":
        return rng.choice(ASK_WHY), rng.choice(("Good question. ", "Sure. ", "")) + card.why
    if kind == "short":
        return rng.choice(ASK_SHORT), rng.choice(SHORT_ANSWERS).format(k=card.key)
    if kind == "thanks":
        return rng.choice(SAY_THANKS), rng.choice(THANKS_ANSWERS).format(topic=card.topic)
    other = rng.choice(others)
    return rng.choice(ASK_RELATED).format(q=other.question), other.answer


def conversation(rng: random.Random, card: Card, by_topic: dict[str, list[Card]]) -> list:
    """Plan a 1-3 exchange conversation about one card.

    The second exchange asks for an example, a reason or a shorter answer; the optional third
    one says thanks, asks for whatever the second did not, or asks a related question.

    Args:
        rng: Source of randomness.
        card: The card that opens the conversation.
        by_topic: All cards grouped by topic (for related questions).

    Returns:
        A list of ``(user text, assistant text)`` exchanges.
    """
    exchanges = [(card.question, card.answer)]
    second = [k for k, v in (("example", card.example), ("why", card.why)) if v]
    if not second or rng.random() < 0.25:
        second.append("short")
    first_kind = rng.choice(second)
    exchanges.append(follow_up(rng, card, first_kind, []))
    if rng.random() < 0.5:
        others = [c for c in by_topic[card.topic] if c is not card]
        third = [k for k in ("example", "why") if getattr(card, k) and k != first_kind]
        third += ["thanks", "related"]
        exchanges.append(follow_up(rng, card, rng.choice(third), others))
    return exchanges


def build_vicuna(
    rng: random.Random, cards: list[Card], by_topic: dict[str, list[Card]]
) -> list[dict]:
    """Build ShareGPT/Vicuna conversations with 2-3 exchanges each.

    Args:
        rng: Source of randomness.
        cards: The cards that open the conversations, one conversation each.
        by_topic: All cards grouped by topic.

    Returns:
        ``{"id", "conversations"}`` rows; about 20% start with a system turn.
    """
    rows = []
    n_system = round(len(cards) * 0.2)
    with_system = set(rng.sample(range(len(cards)), n_system))
    for i, card in enumerate(cards):
        turns = []
        if i in with_system:
            turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        for user, assistant in conversation(rng, card, by_topic):
            turns.append({"from": "human", "value": user})
            turns.append({"from": "gpt", "value": assistant})
        rows.append({"id": f"conv-{i + 1:04d}", "conversations": turns})
    return rows


def build_messages(
    rng: random.Random, cards: list[Card], by_topic: dict[str, list[Card]]
) -> list[dict]:
    """Build OpenAI style ``messages`` rows, single- and multi-turn.

    Args:
        rng: Source of randomness.
        cards: The cards that open the conversations, one row each.
        by_topic: All cards grouped by topic.

    Returns:
        ``{"messages": [...]}`` rows ending with an assistant message.
    """
    rows = []
    for card in cards:
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        exchanges = conversation(rng, card, by_topic)
        if rng.random() < 0.4:
            exchanges = exchanges[:1]
        for user, assistant in exchanges:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        rows.append({"messages": messages})
    return rows


def rejected_answer(rng: random.Random, card: Card, kind: str, cards: list[Card]) -> str:
    """Write a dispreferred answer of the given kind.

    Args:
        rng: Source of randomness.
        card: The card whose question is being answered.
        kind: One of :data:`KINDS`.
        cards: All cards (``off_topic`` answers come from another topic).

    Returns:
        The rejected answer text.
    """
    if kind == "refusal":
        return rng.choice(REFUSALS).format(topic=card.topic)
    if kind == "rude":
        if rng.random() < 0.5:
            return rng.choice(RUDE_ALONE)
        return rng.choice(RUDE_WRAP).format(a=card.answer)
    if kind == "off_topic":  # never a held-out topic's answer: those stay out of training
        return rng.choice([c for c in cards if c.topic != card.topic
                           and c.topic not in HELD_OUT_TOPICS]).answer
    if kind == "repetitive":
        mode = rng.randrange(3)
        times = rng.randint(6, 10)
        if mode == 0:
            phrase = card.key[0].upper() + card.key[1:] + "."
            return " ".join([phrase] * times)
        if mode == 1:
            phrase = " ".join(card.answer.split()[:4]).rstrip(",.;:")
            return ", ".join([phrase] * times) + "..."
        return " ".join([f"It is all about {card.topic}."] * times)
    return rng.choice(EMPTY_ISH)


def build_preference(rng: random.Random, cards: list[Card]) -> list[dict]:
    """Build preference pairs: one per card, rejection kinds spread evenly.

    Kinds are assigned round-robin over the cards in table order, so every kind appears the same
    number of times overall and each topic gets a mix of kinds. The rows are then shuffled.

    Args:
        rng: Source of randomness.
        cards: All knowledge cards.

    Returns:
        ``{"prompt", "chosen", "rejected", "topic", "kind"}`` rows.
    """
    rows = []
    for i, card in enumerate(cards):
        kind = KINDS[i % len(KINDS)]
        rejected = rejected_answer(rng, card, kind, cards)
        rows.append({
            "prompt": card.question,
            "chosen": card.answer,
            "rejected": rejected,
            "topic": card.topic,
            "kind": kind,
        })
    rng.shuffle(rows)
    return rows


def preference_messages(pairs: list[dict], n: int = N_PREFERENCE_MESSAGES) -> list[dict]:
    """Expand preference pairs into the full-transcript message-list form.

    Args:
        pairs: Rows from :func:`build_preference`.
        n: How many of the first pairs to expand.

    Returns:
        ``{"chosen": [user, assistant], "rejected": [user, assistant], "topic"}`` rows.
    """
    rows = []
    for pair in pairs[:n]:
        user = {"role": "user", "content": pair["prompt"]}
        rows.append({
            "chosen": [user, {"role": "assistant", "content": pair["chosen"]}],
            "rejected": [dict(user), {"role": "assistant", "content": pair["rejected"]}],
            "topic": pair["topic"],
        })
    return rows


def build_prompts(rng: random.Random) -> list[dict]:
    """Build the PPO prompt rows.

    Args:
        rng: Source of randomness.

    Returns:
        Shuffled ``{"prompt"}`` rows.
    """
    rows = [{"prompt": line, "topic": "general"} for line in logical_lines(PROMPTS)]
    rng.shuffle(rows)
    return rows


HELD_OUT_TOPICS = {
    # Card topics that only their own cards talk about: a recipe can hold them out of every
    # stage (data.holdout_topics) and ask the trained model about them afterwards.
    "cycling": ("bike", "bicycl", "cycling", "cyclist"),
    "photography": ("photos?\\b", "photograph", "camera"),
    "language learning": ("vocabulary", "new language", "language learning", "learn a language"),
}


def check_held_out(files: dict[str, list[dict]]) -> None:
    """Fail unless only rows tagged with a held-out topic *ask* about it.

    The question of every other row (an Alpaca instruction, a preference or PPO prompt) must
    not name a held-out topic, so holding those rows out by tag keeps the subject out of
    training; other topics' answers may still mention one in passing (a fitness answer names
    cycling). Off-topic rejected answers are never drawn from held-out cards
    (:func:`rejected_answer`).
    """
    for name, rows in files.items():
        for row in rows:
            if "topic" not in row or row["topic"] in HELD_OUT_TOPICS:
                continue
            asked = str(row.get("instruction", row.get("prompt", ""))).lower()
            for topic, words in HELD_OUT_TOPICS.items():
                hit = next((w for w in words if re.search(rf"\b{w}", asked)), None)
                if hit:
                    raise SystemExit(f"{name}: a {row['topic']!r} row asks about {topic} "
                                     f"({hit!r}): {asked[:120]}")


N_ARITHMETIC = 600


def build_arithmetic(rng: random.Random, n: int = N_ARITHMETIC) -> list[dict]:
    """Build two-digit addition prompts with their answers, for a verifiable PPO reward.

    Args:
        rng: Source of randomness.
        n: Rows (distinct ordered pairs of operands).

    Returns:
        ``{"prompt", "answer"}`` rows; ``answer`` is the sum as a string.
    """
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as UTF-8 JSON Lines, one compact object per line.

    Args:
        path: Output file.
        rows: JSON-serializable dicts.
    """
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def readme(counts: dict[str, int], topics: list[str], kinds: dict[str, int]) -> str:
    """Render ``datasets/README.md``.

    Args:
        counts: Row count per file name.
        topics: Topic names used in the preference data.
        kinds: Row count per rejection kind.

    Returns:
        The Markdown text.
    """
    kind_text = ", ".join(f"`{k}` ({n})" for k, n in kinds.items())
    return f"""# llamatune demo datasets

Small, synthetic datasets for examples, tests and smoke runs of llamatune. Every row was
generated by `scripts/make_datasets.py` from hand-written tables and templates (standard
library only, no network, no text taken from other datasets). Regenerate with:

```bash
python scripts/make_datasets.py
```

The script is deterministic (fixed `random.Random` seed), so re-running it rewrites identical
files. Edit the tables in the script rather than the files here; this README is generated too.

License: Apache-2.0, the same as the project. Written for llamatune.

The rows are short and simple on purpose: they are meant to train and test quickly on a small
model (such as SmolLM2-135M-Instruct) on a CPU, not to be a high-quality training corpus.

## Files

### `alpaca.jsonl` ({counts["alpaca.jsonl"]} rows) - format `alpaca`

Fields: `instruction` (str), `input` (str, may be empty), `output` (str), `topic` (str: the
card topic of a question, or the task: `capitals`, `conversions`, `rewriting`, `summaries`,
`sentiment`, `lists`, `grammar`).

Everyday science, cooking, nature, computing and other simple questions; capitals; unit and
temperature conversions (numbers computed by the script); polite rewrites, one-sentence
summaries, sentiment labels and grammar fixes (text in `input`); lists of three items. About a
third of the rows have a non-empty `input`.

Every `output` uses one house style, so a fine-tuned model visibly picks it up: a short direct
answer of 1-3 sentences, then a final line `Key point: <short phrase>.` For example:

```text
The capital of Japan is Tokyo. Japan is located in East Asia.
Key point: Tokyo is the capital of Japan.
```

### `vicuna.jsonl` ({counts["vicuna.jsonl"]} rows) - format `sharegpt`

Fields: `id` (`conv-0001`, ...), `conversations`: a list of `{{"from", "value"}}` turns with
`from` in `system` / `human` / `gpt`. Each conversation has 2 or 3 exchanges, alternates human
and gpt, starts with human (after an optional system turn, about 20% of rows) and ends with gpt.
Follow-ups refer back to the first answer ("Can you give an example?", "Why?", "Shorter
please.", thanks, or a related question).

### `preference.jsonl` ({counts["preference.jsonl"]} rows) - format `preference`

Fields: `prompt` (str), `chosen` (str), `rejected` (str), `topic` (str), `kind` (str).

`chosen` is always a helpful, polite, on-topic answer of 1-3 sentences. `rejected` is one of
five kinds, spread evenly: {kind_text}.

- `refusal`: declines for no reason.
- `rude`: dismissive or insulting; half of these still contain the correct answer, so only the
  tone separates them from `chosen`.
- `off_topic`: a fluent, correct answer to a question from a different topic.
- `repetitive`: one phrase repeated over and over.
- `empty_ish`: a non-answer such as "I don't know."

Correctness of arithmetic is never what separates chosen from rejected. There are
{len(topics)} topics with 8 prompts each, so a grouped split (`data.eval_group_by: topic`) can
hold out whole topics to test that a reward model generalizes to unseen topics. Topics:
{", ".join(topics)}.

### `preference_messages.jsonl` ({counts["preference_messages.jsonl"]} rows) - format `preference`

The first {counts["preference_messages.jsonl"]} rows of `preference.jsonl` in the
"full transcript" form: `chosen` and `rejected` are message lists
(`[{{"role": "user", ...}}, {{"role": "assistant", ...}}]`) that share the user turn, plus
`topic`. There is no `prompt` field; the shared prefix is the prompt.

### `prompts.jsonl` ({counts["prompts.jsonl"]} rows) - format `prompts`

Fields: `prompt` (str): short user questions on varied topics for a PPO stage, `topic` (str,
always `general`). None of them is copied from the other files.

### Held-out topics

{", ".join("`" + t + "`" for t in HELD_OUT_TOPICS)} can be held out of every stage
(`data.holdout_topics`, as `recipes/llama2_chat.yaml` does): only rows tagged with one of them
ask about it (the script checks every other row's question), and off-topic rejected answers
are never drawn from their cards, so a model trained on the rest has never been asked about
them. Other topics' answers may still name them in passing (a fitness answer mentions cycling).

### `arithmetic.jsonl` ({counts["arithmetic.jsonl"]} rows) - format `prompts`

Fields: `prompt` (str): "What is A + B?" with two-digit A and B (distinct ordered pairs),
`answer` (str): the sum. For PPO/GRPO with the rule reward `llamatune.rewards:last_integer`
(right answer = the last integer of the response); hold some rows out with `data.eval_split`.

### `messages.jsonl` ({counts["messages.jsonl"]} rows) - format `messages`

Fields: `messages`: OpenAI style `{{"role", "content"}}` lists (`system` / `user` /
`assistant`), single- and multi-turn, always ending with an assistant message.

## Notes

- Questions in `alpaca.jsonl`, `vicuna.jsonl`, `messages.jsonl` and `preference.jsonl` come
  from one shared pool of hand-written question cards, so the same question can appear in more
  than one file (never twice in one file). `vicuna.jsonl` and `messages.jsonl` use disjoint
  cards.
- Pointing `data.path` at this whole folder would read every `.jsonl` file in it; point it at
  one file instead.
"""


def main(argv: list[str] | None = None) -> None:
    """Generate every dataset file and the README.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets", help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    cards = parse_cards(CARDS)
    by_topic: dict[str, list[Card]] = {}
    for card in cards:
        by_topic.setdefault(card.topic, []).append(card)

    # Separate streams per file, so editing one table does not reshuffle the other files.
    def stream(name: str) -> random.Random:
        return random.Random(f"{args.seed}:{name}")

    pool = list(cards)
    stream("split").shuffle(pool)
    rich = [c for c in pool if c.example or c.why]
    plain = [c for c in pool if not (c.example or c.why)]
    vicuna_cards = (rich + plain)[:150]
    message_cards = (rich + plain)[150:210]

    pairs = build_preference(stream("preference"), cards)
    files = {
        "alpaca.jsonl": build_alpaca(stream("alpaca"), cards),
        "vicuna.jsonl": build_vicuna(stream("vicuna"), vicuna_cards, by_topic),
        "preference.jsonl": pairs,
        "preference_messages.jsonl": preference_messages(pairs),
        "prompts.jsonl": build_prompts(stream("prompts")),
        "messages.jsonl": build_messages(stream("messages"), message_cards, by_topic),
        "arithmetic.jsonl": build_arithmetic(stream("arithmetic")),
    }
    check_held_out(files)
    counts = {}
    for name, rows in files.items():
        path = out / name
        write_jsonl(path, rows)
        counts[name] = len(rows)
        print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.1f} KB")

    kinds = {k: sum(p["kind"] == k for p in pairs) for k in KINDS}
    (out / "README.md").write_text(readme(counts, list(by_topic), kinds), encoding="utf-8")
    print(f"{out / 'README.md'}: written")


if __name__ == "__main__":
    main()
