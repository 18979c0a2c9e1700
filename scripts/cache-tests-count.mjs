// Counts a cache-tests results file as cache-tests.fyi does (determineTestResult).
// Usage: node cache-tests-count.mjs SUITE_DIR RESULTS_JSON
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suiteDir, resultsFile] = process.argv.slice(2)
const load = (relative) => import(pathToFileURL(path.join(suiteDir, relative)).href)
const { determineTestResult, resultTypes } = await load('test-engine/lib/results.mjs')
const tests = (await load('tests/index.mjs')).default

const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
const names = Object.fromEntries(Object.entries(resultTypes).map(([name, type]) => [type[2], name]))
const counts = {}
const failed = []
let total = 0
for (const suite of tests) {
  for (const test of suite.tests) {
    total += 1
    const name = names[determineTestResult(tests, test.id, results)[2]]
    counts[name] = (counts[name] || 0) + 1
    if (name === 'fail') failed.push(test.id)
  }
}
console.log(JSON.stringify({ total, ...counts, failed }, null, 2))
