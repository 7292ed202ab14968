"""The word-problem templates behind `generators.py`, kept apart so the engine stays readable.

A template is a story: a start sentence that introduces one quantity, then a chain of operations,
each one sentence of the question and one arithmetic step of the solution. `level` = number of
operations.

Text fields are `str.format` patterns. Question fields: {name} {friend} {He} {he} {him} {his} {His},
{x} (start value), {k} (operand; a fraction in words for `frac`), and, in chain templates where each
step introduces a new person, {prev} and {new}. Solution sentences (`say`) also get {math}, the
arithmetic written out ("3 * 12 = 36"). Variable names may use {name_l} / {new_l} (lower-case
names). `ask` / `tell` (the question and the closing statement, {ans} = the answer) come from the
last operation when it sets them, else from the template. `last=True` marks operations that change
what the quantity means (a share, a count of boxes), so they can only end a problem.

No text may contain the substring "def": the study's style labeller treats it as Python
(STUDIES.md A).
"""

import dataclasses

KINDS = ("add", "sub", "mul", "div", "pct", "pct_off", "frac")
_DEFAULT_RANGE = {"add": (2, 50), "sub": (2, 50), "mul": (2, 10), "div": (2, 12)}


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: a question sentence and the arithmetic step it asks for."""

    kind: str
    text: str
    arg: str
    out: str
    say: str
    last: bool = False
    once: bool = False
    ask: str = ""
    tell: str = ""
    lo: int = 0
    hi: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; valid: {KINDS}")
        lo, hi = _DEFAULT_RANGE.get(self.kind, (0, 0))
        object.__setattr__(self, "lo", self.lo or lo)
        object.__setattr__(self, "hi", self.hi or hi)


@dataclasses.dataclass(frozen=True)
class Template:
    """A story with a start quantity, a pool of operations and an optional forced first one."""

    name: str
    start: str
    var: str
    ask: str
    tell: str
    ops: tuple[Op, ...]
    head: Op | None = None
    chain: bool = False
    lo: int = 2
    hi: int = 50
    cap: int = 999


def _chain_ops(noun: str) -> tuple[Op, ...]:
    """Comparisons between people ("{new} has 3 more ... than {prev}") shared by chain templates."""
    return (
        Op("add", "{new} has {k} more " + noun + " than {prev}.", "{new_l}_extra",
           "{new_l}_" + noun, "{new} has {math} " + noun + "."),
        Op("sub", "{new} has {k} fewer " + noun + " than {prev}.", "{new_l}_fewer",
           "{new_l}_" + noun, "{new} has {math} " + noun + "."),
        Op("mul", "{new} has {k} times as many " + noun + " as {prev}.", "{new_l}_factor",
           "{new_l}_" + noun, "{new} has {math} " + noun + ".", hi=4),
        Op("div", "{prev} has {k} times as many " + noun + " as {new}.", "{prev_l}_factor",
           "{new_l}_" + noun, "{new} has {math} " + noun + ".", hi=4),
    )


TEMPLATES: tuple[Template, ...] = (
    Template(
        "marbles", "{name} has {x} marbles.", "marbles",
        "How many marbles does {name} have now?", "{name} has {ans} marbles now", (
            Op("add", "{He} wins {k} more marbles in a game.", "marbles_won", "marbles_after_game",
               "After winning {k} marbles, {he} has {math} marbles."),
            Op("sub", "{He} gives {k} marbles to {friend}.", "marbles_given", "marbles_after_gift",
               "Giving {k} marbles to {friend} leaves {him} with {math} marbles."),
            Op("mul", "A trade with {friend} makes {his} collection {k} times as big.",
               "trade_factor", "marbles_after_trade", "After the trade {he} has {math} marbles.",
               hi=5),
            Op("frac", "{He} keeps {k} of them and sells the rest.", "", "marbles_kept",
               "{He} keeps {math} marbles."),
            Op("div", "{He} puts all of them into {k} bags with the same number in each bag.",
               "bags", "marbles_per_bag", "Each bag gets {math} marbles.", last=True,
               ask="How many marbles are in each bag?", tell="there are {ans} marbles in each bag"),
        )),
    Template(
        "fruit_boxes", "{name} buys {x} boxes of apples.", "boxes",
        "How many apples does {name} have now?", "{name} has {ans} apples now", (
            Op("sub", "{He} eats {k} of the apples.", "apples_eaten", "apples_left",
               "After eating {k} apples, {he} has {math} apples left."),
            Op("add", "{friend} gives {him} {k} more apples.", "apples_from_friend", "apples_now",
               "With {k} more apples from {friend}, {he} has {math} apples."),
            Op("frac", "{He} uses {k} of the apples to bake pies.", "", "apples_for_pies",
               "{He} uses {math} apples for pies.", last=True,
               ask="How many apples does {name} use for pies?",
               tell="{name} uses {ans} apples for pies"),
            Op("div", "{He} packs the apples into bags of {k} apples each.", "apples_per_bag",
               "bags", "{He} fills {math} bags.", last=True, ask="How many bags does {name} fill?",
               tell="{name} fills {ans} bags"),
        ),
        head=Op("mul", "Each box holds {k} apples.", "apples_per_box", "total_apples",
                "{x} boxes with {k} apples each hold {math} apples.", hi=12), hi=20),
    Template(
        "shopping", "{name} buys {x} notebooks.", "notebooks",
        "How many dollars does {name} pay?", "{name} pays {ans} dollars", (
            Op("add", "{He} also buys a backpack for ${k}.", "backpack_price", "cost_with_backpack",
               "With the backpack the total is {math} dollars."),
            Op("sub", "{He} uses a coupon worth ${k}.", "coupon", "cost_after_coupon",
               "The coupon brings the cost down to {math} dollars."),
            Op("pct_off", "The store gives {him} a {k}% discount on the total.", "discount_percent",
               "discounted_cost", "A {k}% discount leaves {math} dollars."),
            Op("mul", "{He} makes the same purchase {k} times this year.", "purchases",
               "yearly_cost", "Over {k} purchases {he} pays {math} dollars.", once=True, hi=6),
            Op("div", "{He} and {his} friends split the cost equally among {k} people.", "people",
               "cost_per_person", "Each person pays {math} dollars.", last=True,
               ask="How many dollars does each person pay?", tell="each person pays {ans} dollars"),
        ),
        head=Op("mul", "Each notebook costs ${k}.", "price_per_notebook", "notebook_cost",
                "{x} notebooks at {k} dollars each cost {math} dollars.", hi=9), hi=20),
    Template(
        "savings", "{name} saves ${x} every week.", "weekly_savings",
        "How many dollars does {name} have now?", "{name} has {ans} dollars now", (
            Op("add", "{His} grandmother gives {him} ${k} for {his} birthday.", "birthday_money",
               "savings_with_gift", "With the {k} dollar gift {he} has {math} dollars."),
            Op("sub", "{He} spends ${k} on a video game.", "game_price", "savings_left",
               "After buying the game {he} has {math} dollars."),
            Op("pct", "{He} puts {k}% of {his} money into a bank account.", "bank_percent",
               "money_in_bank", "{He} puts {math} dollars into the bank.", last=True,
               ask="How many dollars does {name} put in the bank?",
               tell="{name} puts {ans} dollars in the bank"),
            Op("div", "{He} shares the money equally among {k} charities.", "charities",
               "donation_per_charity", "Each charity gets {math} dollars.", last=True,
               ask="How many dollars does each charity get?",
               tell="each charity gets {ans} dollars"),
        ),
        head=Op("mul", "{He} saves for {k} weeks.", "weeks", "savings",
                "In {k} weeks {he} saves {math} dollars.", hi=12), hi=30),
    Template(
        "ages", "{name} is {x} years old.", "{name_l}_age", "How old is {new}?",
        "{new} is {ans} years old", (
            Op("add", "{new} is {k} years older than {prev}.", "{new_l}_older_by", "{new_l}_age",
               "{new} is {math} years old.", hi=30),
            Op("sub", "{new} is {k} years younger than {prev}.", "{new_l}_younger_by",
               "{new_l}_age", "{new} is {math} years old.", hi=30),
            Op("mul", "{new} is {k} times as old as {prev}.", "{new_l}_age_factor", "{new_l}_age",
               "{new} is {math} years old.", hi=4),
            Op("div", "{prev} is {k} times as old as {new}.", "{prev_l}_age_factor", "{new_l}_age",
               "{new} is {math} years old.", hi=4),
        ), chain=True, lo=4, hi=40, cap=120),
    Template(
        "towers", "{name} builds a tower of {x} blocks.", "{name_l}_blocks",
        "How many blocks are in {new}'s tower?", "{new}'s tower has {ans} blocks", (
            Op("add", "{new}'s tower has {k} more blocks than {prev}'s.", "{new_l}_extra",
               "{new_l}_blocks", "{new}'s tower has {math} blocks."),
            Op("sub", "{new}'s tower has {k} fewer blocks than {prev}'s.", "{new_l}_fewer",
               "{new_l}_blocks", "{new}'s tower has {math} blocks."),
            Op("mul", "{new}'s tower is {k} times as tall as {prev}'s.", "{new_l}_factor",
               "{new_l}_blocks", "{new}'s tower has {math} blocks.", hi=4),
            Op("div", "{prev}'s tower is {k} times as tall as {new}'s.", "{prev_l}_factor",
               "{new_l}_blocks", "{new}'s tower has {math} blocks.", hi=4),
        ), chain=True),
    Template(
        "stamps", "{name} has {x} stamps.", "{name_l}_stamps", "How many stamps does {new} have?",
        "{new} has {ans} stamps", _chain_ops("stamps"), chain=True),
    Template(
        "train_trip", "A train travels at {x} miles per hour.", "speed",
        "How many miles does the train travel in total?", "the train travels {ans} miles", (
            Op("add", "Then it travels another {k} miles.", "extra_miles", "total_distance",
               "Adding {k} more miles gives {math} miles."),
            Op("mul", "It makes the same trip {k} times this month.", "trips", "monthly_distance",
               "Over {k} trips it travels {math} miles.", once=True, hi=5),
            Op("sub", "{k} of those miles are inside tunnels.", "tunnel_miles", "open_air_miles",
               "Outside the tunnels it travels {math} miles.", last=True,
               ask="How many miles are not inside tunnels?",
               tell="{ans} miles are not inside tunnels"),
            Op("div", "The route is split into {k} sections of equal length.", "sections",
               "section_length", "Each section is {math} miles long.", last=True,
               ask="How many miles long is each section?", tell="each section is {ans} miles long"),
        ),
        head=Op("mul", "It travels for {k} hours.", "hours", "distance",
                "In {k} hours it covers {math} miles.", hi=8), lo=20, hi=80),
    Template(
        "factory", "A machine makes {x} toys every hour.", "toys_per_hour",
        "How many toys are made in total?", "{ans} toys are made in total", (
            Op("mul", "It runs like this for {k} days.", "days", "toys_in_all_days",
               "In {k} days it makes {math} toys.", once=True, hi=7),
            Op("sub", "{k} of the toys are broken and thrown away.", "broken_toys", "good_toys",
               "Without the broken ones there are {math} toys.",
               ask="How many good toys are there?", tell="there are {ans} good toys"),
            Op("add", "Workers also make {k} toys by hand.", "handmade_toys", "all_toys",
               "With the handmade toys there are {math} toys."),
            Op("div", "The toys are packed in boxes of {k}.", "toys_per_box", "boxes",
               "They fill {math} boxes.", last=True, ask="How many boxes are filled?",
               tell="{ans} boxes are filled"),
            Op("pct", "{k}% of the toys are painted red.", "red_percent", "red_toys",
               "{math} toys are painted red.", last=True, ask="How many toys are painted red?",
               tell="{ans} toys are painted red"),
        ),
        head=Op("mul", "It runs for {k} hours each day.", "hours_per_day", "toys_per_day",
                "In {k} hours it makes {math} toys.", hi=12), hi=30),
    Template(
        "homework", "{name} needs {x} minutes for each homework problem.", "minutes_per_problem",
        "How many minutes does {name} spend in total?", "{name} spends {ans} minutes", (
            Op("add", "{He} also spends {k} minutes reading.", "reading_minutes",
               "minutes_with_reading", "Reading adds {k} minutes, so {he} spends {math} minutes."),
            Op("add", "{He} takes a {k}-minute break.", "break_minutes", "minutes_with_break",
               "With the break it takes {math} minutes.", hi=20),
            Op("sub", "{friend} helps {him} and saves {him} {k} minutes.", "minutes_saved",
               "minutes_needed", "With help it takes {math} minutes."),
            Op("mul", "{He} does the same every day for {k} days.", "days", "minutes_over_days",
               "Over {k} days that is {math} minutes.", once=True, hi=7),
            Op("div", "{He} splits the time equally over {k} evenings.", "evenings",
               "minutes_per_evening", "Each evening takes {math} minutes.", last=True,
               ask="How many minutes does {name} work each evening?",
               tell="{name} works {ans} minutes each evening"),
        ),
        head=Op("mul", "{He} has {k} problems to do.", "problems", "homework_minutes",
                "{k} problems at {x} minutes each take {math} minutes."), hi=15),
    Template(
        "pizza", "There are {x} pizzas at a party.", "pizzas",
        "How many slices are there now?", "there are {ans} slices now", (
            Op("add", "The host orders {k} more slices.", "extra_slices", "slices_now",
               "With {k} more slices there are {math} slices."),
            Op("sub", "{name} drops {k} slices on the floor.", "dropped_slices", "slices_left",
               "After {k} slices are dropped, {math} slices are left.",
               ask="How many slices are left?", tell="{ans} slices are left"),
            Op("frac", "The guests eat {k} of the slices.", "", "slices_eaten",
               "The guests eat {math} slices.", last=True, ask="How many slices do the guests eat?",
               tell="the guests eat {ans} slices"),
            Op("div", "The slices are shared equally among {k} children.", "children",
               "slices_per_child", "Each child gets {math} slices.", last=True,
               ask="How many slices does each child get?", tell="each child gets {ans} slices"),
        ),
        head=Op("mul", "Each pizza is cut into {k} slices.", "slices_per_pizza", "slices",
                "{x} pizzas with {k} slices each make {math} slices.", lo=4, hi=12), hi=20),
    Template(
        "school", "A school has {x} classes.", "classes",
        "How many students are there?", "there are {ans} students", (
            Op("add", "{k} new students join the school.", "new_students", "students_now",
               "With {k} new students there are {math} students."),
            Op("sub", "{k} students move away.", "students_moved", "students_left",
               "After {k} students move away there are {math} students."),
            Op("pct", "{k}% of the students play soccer.", "soccer_percent", "soccer_players",
               "{math} students play soccer.", last=True, ask="How many students play soccer?",
               tell="{ans} students play soccer"),
            Op("pct_off", "{k}% of the students are absent today.", "absent_percent",
               "students_present", "If {k}% are absent, {math} students are present.", last=True,
               ask="How many students are present today?", tell="{ans} students are present today"),
            Op("div", "The students are split into teams of {k}.", "team_size", "teams",
               "That makes {math} teams.", last=True, ask="How many teams are there?",
               tell="there are {ans} teams"),
        ),
        head=Op("mul", "Each class has {k} students.", "students_per_class", "students",
                "{x} classes with {k} students each make {math} students.", lo=10, hi=30), hi=30),
    Template(
        "candy", "{name} has {x} bags of candy.", "candy_bags",
        "How many candies does {name} have now?", "{name} has {ans} candies now", (
            Op("add", "{friend} gives {him} {k} more candies.", "candies_from_friend",
               "candies_with_gift", "With {k} more candies {he} has {math} candies."),
            Op("sub", "{He} eats {k} candies.", "candies_eaten", "candies_left",
               "After eating {k} candies {he} has {math} candies."),
            Op("div", "{He} shares the candies equally among {k} friends.", "friends",
               "candies_per_friend", "Each friend gets {math} candies.", last=True,
               ask="How many candies does each friend get?", tell="each friend gets {ans} candies"),
            Op("frac", "{He} gives {k} of the candies to {his} sister.", "", "candies_for_sister",
               "{His} sister gets {math} candies.", last=True,
               ask="How many candies does {name} give to {his} sister?",
               tell="{name} gives {ans} candies to {his} sister"),
        ),
        head=Op("mul", "Each bag has {k} candies.", "candies_per_bag", "candies",
                "{x} bags with {k} candies each hold {math} candies.", hi=20), hi=20),
    Template(
        "library", "A library has {x} shelves.", "shelves",
        "How many books does the library have now?", "the library has {ans} books now", (
            Op("add", "The library buys {k} new books.", "new_books", "books_after_buying",
               "After buying {k} books it has {math} books."),
            Op("sub", "Readers borrow {k} books.", "borrowed_books", "books_on_shelves",
               "With {k} books borrowed, {math} books are on the shelves.",
               ask="How many books are still on the shelves?",
               tell="{ans} books are still on the shelves"),
            Op("pct", "{k}% of the books are novels.", "novel_percent", "novels",
               "{math} of the books are novels.", last=True, ask="How many novels are there?",
               tell="there are {ans} novels"),
            Op("div", "The books are packed into boxes of {k}.", "books_per_box", "boxes",
               "That fills {math} boxes.", last=True, ask="How many boxes are needed?",
               tell="{ans} boxes are needed"),
        ),
        head=Op("mul", "Each shelf holds {k} books.", "books_per_shelf", "books",
                "{x} shelves with {k} books each hold {math} books.", lo=10, hi=40), hi=20),
    Template(
        "cookies", "{name} bakes {x} batches of cookies.", "batches",
        "How many cookies does {name} have now?", "{name} has {ans} cookies now", (
            Op("sub", "{He} eats {k} cookies.", "cookies_eaten", "cookies_left",
               "After eating {k} cookies, {math} cookies are left."),
            Op("add", "{friend} brings {k} more cookies.", "cookies_from_friend", "all_cookies",
               "With {friend}'s cookies there are {math} cookies."),
            Op("div", "{He} puts the cookies into {k} jars with the same number in each.", "jars",
               "cookies_per_jar", "Each jar holds {math} cookies.", last=True,
               ask="How many cookies are in each jar?", tell="each jar holds {ans} cookies"),
            Op("frac", "{He} gives {k} of the cookies to {his} neighbors.", "", "cookies_given",
               "{He} gives away {math} cookies.", last=True,
               ask="How many cookies does {name} give to {his} neighbors?",
               tell="{name} gives {ans} cookies to {his} neighbors"),
        ),
        head=Op("mul", "Each batch makes {k} cookies.", "cookies_per_batch", "cookies",
                "{x} batches of {k} cookies make {math} cookies.", lo=6, hi=24), hi=10),
    Template(
        "reading", "{name} reads {x} pages every day.", "pages_per_day",
        "How many pages has {name} read?", "{name} has read {ans} pages", (
            Op("add", "On the weekend {he} reads {k} extra pages.", "weekend_pages",
               "pages_with_weekend", "With {k} weekend pages {he} reads {math} pages."),
            Op("add", "{He} also reads a comic with {k} pages.", "comic_pages", "pages_with_comic",
               "With the comic {he} reads {math} pages."),
            Op("sub", "{He} already knew {k} of those pages from before.", "known_pages",
               "new_pages", "That leaves {math} new pages.", last=True,
               ask="How many new pages has {name} read?", tell="{name} has read {ans} new pages"),
            Op("div", "The pages make up chapters of {k} pages each.", "pages_per_chapter",
               "chapters", "That is {math} chapters.", last=True,
               ask="How many chapters has {name} read?", tell="{name} has read {ans} chapters"),
        ),
        head=Op("mul", "{He} reads for {k} days.", "days", "pages_read",
                "In {k} days {he} reads {math} pages.", hi=14), hi=40),
    Template(
        "cycling", "{name} cycles {x} kilometers every day.", "km_per_day",
        "How many kilometers does {name} cycle in total?", "{name} cycles {ans} kilometers", (
            Op("add", "{He} also goes on a long Sunday ride of {k} kilometers.", "sunday_km",
               "km_with_sunday", "With the Sunday ride that is {math} kilometers."),
            Op("mul", "{He} keeps this up for {k} weeks.", "weeks", "km_over_weeks",
               "Over {k} weeks that is {math} kilometers.", once=True, hi=4),
            Op("pct", "{k}% of the distance is uphill.", "uphill_percent", "uphill_km",
               "{math} kilometers are uphill.", last=True, ask="How many kilometers are uphill?",
               tell="{ans} kilometers are uphill"),
            Op("sub", "{k} kilometers of it are on dirt roads.", "dirt_km", "paved_km",
               "The paved part is {math} kilometers.", last=True,
               ask="How many kilometers are on paved roads?",
               tell="{ans} kilometers are on paved roads"),
        ),
        head=Op("mul", "{He} cycles for {k} days.", "days", "km_in_days",
                "In {k} days {he} cycles {math} kilometers.", hi=7), hi=30),
    Template(
        "farm", "A farm has {x} chickens.", "chickens",
        "How many eggs does the farmer have?", "the farmer has {ans} eggs", (
            Op("mul", "The farmer collects eggs for {k} weeks.", "weeks", "eggs_in_weeks",
               "In {k} weeks that is {math} eggs.", once=True, hi=4),
            Op("sub", "{k} eggs break.", "broken_eggs", "good_eggs",
               "After {k} eggs break there are {math} eggs."),
            Op("add", "The farmer buys {k} more eggs at the market.", "bought_eggs", "all_eggs",
               "With {k} more eggs there are {math} eggs."),
            Op("div", "The eggs are packed into cartons of {k}.", "eggs_per_carton", "cartons",
               "That fills {math} cartons.", last=True, ask="How many cartons are filled?",
               tell="{ans} cartons are filled"),
            Op("pct", "The farmer sells {k}% of the eggs.", "sold_percent", "sold_eggs",
               "The farmer sells {math} eggs.", last=True,
               ask="How many eggs does the farmer sell?", tell="the farmer sells {ans} eggs"),
        ),
        head=Op("mul", "Each chicken lays {k} eggs a week.", "eggs_per_chicken", "eggs_per_week",
                "{x} chickens laying {k} eggs each give {math} eggs.", hi=7), hi=40),
    Template(
        "salary", "{name} earns ${x} per hour.", "hourly_wage",
        "How many dollars does {name} have?", "{name} has {ans} dollars", (
            Op("mul", "{He} works for {k} weeks.", "weeks", "pay_for_weeks",
               "In {k} weeks {he} earns {math} dollars.", once=True, hi=4),
            Op("add", "{He} gets a bonus of ${k}.", "bonus", "pay_with_bonus",
               "With the bonus {he} has {math} dollars."),
            Op("sub", "{He} pays ${k} for bus tickets.", "bus_tickets", "money_left",
               "After the bus tickets {he} has {math} dollars."),
            Op("pct", "{He} saves {k}% of the money.", "savings_percent", "money_saved",
               "{He} saves {math} dollars.", last=True, ask="How many dollars does {name} save?",
               tell="{name} saves {ans} dollars"),
            Op("pct_off", "{k}% of the money goes to taxes.", "tax_percent", "money_after_tax",
               "After {k}% tax {he} keeps {math} dollars.", last=True,
               ask="How many dollars does {name} keep after taxes?",
               tell="{name} keeps {ans} dollars after taxes"),
        ),
        head=Op("mul", "{He} works {k} hours a week.", "hours_per_week", "weekly_pay",
                "Working {k} hours at {x} dollars an hour earns {math} dollars.", lo=5, hi=40),
        lo=8, hi=25),
    Template(
        "water_tank", "A tank holds {x} liters of water.", "liters",
        "How many liters of water are in the tank now?", "the tank holds {ans} liters now", (
            Op("add", "A pump adds {k} liters.", "pumped_liters", "liters_after_pump",
               "After pumping there are {math} liters."),
            Op("sub", "{k} liters leak out.", "leaked_liters", "liters_after_leak",
               "After the leak there are {math} liters."),
            Op("mul", "A storm fills it until it holds {k} times as much.", "storm_factor",
               "liters_after_storm", "After the storm it holds {math} liters.", hi=3),
            Op("div", "The water is poured into {k} buckets equally.", "buckets",
               "liters_per_bucket", "Each bucket gets {math} liters.", last=True,
               ask="How many liters are in each bucket?", tell="each bucket holds {ans} liters"),
            Op("frac", "{k} of the water is used for the garden.", "", "garden_liters",
               "The garden uses {math} liters.", last=True,
               ask="How many liters are used for the garden?", tell="the garden uses {ans} liters"),
        ), lo=10, hi=50),
)
